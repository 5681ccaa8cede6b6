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

import pyarrow as pa
from datasets import Dataset, DatasetDict
from filelock import FileLock

from sft.common.config import DataArguments
from sft.common.files import check_writable_folder, reporting_full_disk
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


def arrow_rows(path: Path) -> int:
    """Rows of an Arrow stream file; every record batch must lie within the file (memory-mapped, so cheap)."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().num_rows


def is_readable(folder: Path) -> bool:
    """Every split of a complete cache folder holds the rows `stats.json` counted. A damaged tokenization cache
    (`cache-*.arrow`, written there by `datasets` when the trainer tokenizes) is deleted, to be made again."""
    for tokenized in sorted(folder.glob("cache-*.arrow")):
        try:
            arrow_rows(tokenized)
        except (OSError, pa.ArrowException) as err:
            logger.warning("the tokenization cache %s is damaged (%s): deleting it to tokenize again", tokenized, err)
            tokenized.unlink()
    try:
        for split, rows in json.loads((folder / STATS_FILE).read_text(encoding="utf-8"))["samples"].items():
            if (found := arrow_rows(folder / f"{split}.arrow")) != rows:
                raise ValueError(f"{split}.arrow holds {found} rows, stats.json counted {rows}")
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        logger.warning("the prepared data in %s cannot be read (%s): preparing it again", folder, err)
        return False
    return True


def build_once(folder: Path, what: str, build: Callable[[Path, Path], None]) -> Path:
    """`folder`, complete: reused when it has `stats.json` and reads back whole, else built by `build(work, out)`
    and moved in place."""
    check_writable_folder(folder.parent, "processed_dir")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):  # one process prepares, the others (other ranks, other runs) wait and reuse
        if (folder / STATS_FILE).is_file() and is_readable(folder):
            logger.info("reusing the data prepared in %s", folder)
            return folder
        logger.info("preparing %s into %s", what, folder)
        scratch = folder.with_name(f"{folder.name}.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        advice = "free some space there (or choose another processed_dir) and run the same command again"
        try:
            with reporting_full_disk(folder.parent, advice):
                for part in ("work", "data"):
                    (scratch / part).mkdir(parents=True)
                build(scratch / "work", scratch / "data")
            shutil.rmtree(folder, ignore_errors=True)  # without stats.json it is what an interrupted run left
            os.replace(scratch / "data", folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


def is_prepared(args: DataArguments, seed: int) -> bool:
    """Whether the cache already holds the prepared data of these arguments (one source; a mixture says no)."""
    if args.datasets:
        return False
    args = with_lccc_names(args)
    _, path = locate_source(args)
    return (cache_folder(args, seed, path) / STATS_FILE).is_file()


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
    held_out = [path.stem for split in SPLITS[1:] for path in folder.glob(f"{split}-*.arrow")]  # not datasets' cache-*
    names = [*SPLITS, *sorted(held_out)]
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
