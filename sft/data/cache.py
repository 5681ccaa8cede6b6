"""The cache: prepared data in `<processed_dir>/<name>-<key>/`, reused while arguments, seed, source and code stay."""

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict
from filelock import FileLock

from sft.config import DataArguments
from sft.data.pipeline import prepare
from sft.data.records import SPLITS
from sft.data.sources import LCCC_HUB_ID, PARQUET_REVISION, locate_source, with_lccc_names
from sft.data.stats import STATS_FILE, summary, utterance_counts, write_stats

logger = logging.getLogger(__name__)


NOT_IN_CACHE_KEY = ("processed_dir", "num_proc", "max_malformed_share")
_UNSAFE_IN_NAME = re.compile(r"[^\w-]+")


def source_fingerprint(path: Path | None, args: DataArguments) -> list:
    """What identifies the source: a file's path, size and modification time, or a Hub id, config and revision."""
    if path is None:
        return [args.dataset_name, args.dataset_config, PARQUET_REVISION if args.dataset_name == LCCC_HUB_ID else None]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def code_hash() -> str:
    """A hash of this package's code: a change to how data is prepared prepares it anew."""
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.read_bytes())
    return digest.hexdigest()


def cache_folder(args: DataArguments, seed: int, path: Path | None) -> Path:
    """`<processed_dir>/<name>-<key>`; the key changes with any data argument, the seed, the source or the code."""
    identity = {
        "arguments": {k: v for k, v in dataclasses.asdict(args).items() if k not in NOT_IN_CACHE_KEY},
        "seed": seed,
        "source": source_fingerprint(path, args),
        "code": code_hash(),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    if path is None:
        stem = args.dataset_name.split("/")[-1] + (f"-{args.dataset_config}" if args.dataset_config else "")
    else:
        stem = path.name.split(".")[0]
    return Path(args.processed_dir) / f"{_UNSAFE_IN_NAME.sub('_', stem)}-{key}"


def build_once(folder: Path, what: str, build: Callable[[Path, Path], None]) -> Path:
    """`folder`, complete: reused when it has `stats.json`, else built by `build(work, out)` and moved in place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):  # one process prepares, the others (other ranks, other runs) wait and reuse
        if (folder / STATS_FILE).is_file():
            logger.info("reusing the data prepared in %s", folder)
            return folder
        logger.info("preparing %s into %s", what, folder)
        scratch = folder.with_name(f"{folder.name}.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        for part in ("work", "data"):
            (scratch / part).mkdir(parents=True)
        try:
            build(scratch / "work", scratch / "data")
            shutil.rmtree(folder, ignore_errors=True)  # without stats.json it is what an interrupted run left
            os.replace(scratch / "data", folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


def prepared_folder(args: DataArguments, seed: int) -> Path:
    """The cache folder of these data arguments, prepared first when it does not exist yet."""
    args = with_lccc_names(args)
    kind, path = locate_source(args)

    def build(work: Path, out: Path) -> None:
        write_summary(out, prepare(args, seed, kind, path, work, out), args, seed)

    return build_once(cache_folder(args, seed, path), args.dataset_name, build)


def load_prepared(folder: Path) -> DatasetDict:
    """The splits of a cache folder, memory-mapped: train, validation, test, and a mixture's per-source
    `validation-<label>` and `test-<label>`."""
    names = [*SPLITS, *sorted(path.stem for path in folder.glob("*-*.arrow"))]
    return DatasetDict({name: Dataset.from_file(str(folder / f"{name}.arrow")) for name in names})


def write_summary(folder: Path, stats: dict, args: DataArguments, seed: int) -> None:
    """`stats.json`, written last: a cache folder that has it is complete."""
    saved = load_prepared(folder)
    arguments = {k: v for k, v in dataclasses.asdict(args).items() if k not in NOT_IN_CACHE_KEY}
    write_stats(
        folder,
        {
            "arguments": {**arguments, "seed": seed},
            **stats,
            "samples": {split: len(ds) for split, ds in saved.items()},
            "utterances_per_sample": {split: summary(utterance_counts(ds)) for split, ds in saved.items()},
        },
    )
