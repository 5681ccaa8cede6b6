"""Read, clean, deduplicate, split and convert one source into `<split>.arrow` files of chat samples."""

import logging
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features

from sft.common.config import DataArguments
from sft.common.errors import UserError
from sft.data.clean import clean_batch, clean_features, flatten_samples
from sft.data.conversations import SAMPLE_FEATURES, sample_format
from sft.data.records import SPLITS, WRITE_BATCH_ROWS, Source
from sft.data.sources import read_source

logger = logging.getLogger(__name__)


PARALLEL_FROM_ROWS = 50_000  # below this, starting worker processes costs more than it saves
MALFORMED_EXAMPLES = 5


def workers(args: DataArguments, rows: int) -> int | None:
    """Worker processes for a map over `rows` records: all usable cores for large data, or `num_proc`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = args.num_proc or (cores if rows >= PARALLEL_FROM_ROWS else 1)
    return count if count > 1 and rows > count else None


def clean_split(ds: Dataset, split: str, source: Source, args: DataArguments, work: Path) -> Dataset:
    return ds.map(
        clean_batch,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=clean_features(args, source.form),
        fn_kwargs={
            "column": source.column,
            "record_format": source.record_format,
            "form": source.form,
            "location": source.location if source.location == "line" else f"{split} {source.location}",
            "args": args,
        },
        num_proc=workers(args, len(ds)),
        cache_file_name=str(work / f"clean-{split}.arrow"),
        desc=f"Cleaning {split}",
    )


def tally(cleaned: dict[str, Dataset]) -> dict:
    """Dialogues read and dropped by reason, utterances cut by reason, and the first malformed records."""
    reasons, cut, problems = Counter(), Counter(), []
    for ds in cleaned.values():
        for entry in pc.value_counts(ds.data.column("reason")).to_pylist():
            reasons[entry["values"]] += entry["counts"]
        cut["empty"] += pc.sum(ds.data.column("cut_empty")).as_py() or 0
        cut["too_long"] += pc.sum(ds.data.column("cut_long")).as_py() or 0
        problems += pc.drop_null(ds.data.column("problem")).slice(0, MALFORMED_EXAMPLES).to_pylist()
    return {
        "dialogues_read": sum(len(ds) for ds in cleaned.values()) - reasons["blank"],
        "dropped_dialogues": {"malformed": reasons["malformed"], "too_short": reasons["too_short"], "duplicate": 0},
        "cut_utterances": {"empty": cut["empty"], "too_long": cut["too_long"]},
        "malformed_examples": problems[:MALFORMED_EXAMPLES],
    }


def check_malformed(counts: dict, name: str, args: DataArguments) -> None:
    """Skip a few malformed records with a warning; stop when there are more than `max_malformed_share`."""
    read, malformed = counts["dialogues_read"], counts["dropped_dialogues"]["malformed"]
    if not read:
        raise UserError(f"{name} holds no dialogues")
    first = "; ".join(counts["malformed_examples"])
    if malformed > args.max_malformed_share * read:
        raise UserError(
            f"{malformed} of {read} records in {name} are malformed ({malformed / read:.1%}, more than "
            f"max_malformed_share={args.max_malformed_share}); first: {first}"
        )
    if malformed:
        logger.warning("skipped %d malformed records of %d in %s; first: %s", malformed, read, name, first)


def first_copies(cleaned: dict[str, Dataset]) -> dict[str, np.ndarray]:
    """Rows of the usable dialogues of each split, each dialogue once: a test copy wins over validation and train."""
    order = [split for split in ("test", "validation", "train") if split in cleaned]
    usable = {s: np.flatnonzero(pc.is_null(cleaned[s].data.column("reason")).to_numpy()) for s in order}
    hashes = np.concatenate([cleaned[s].data.column("hash").to_numpy()[usable[s]] for s in order])
    first = np.zeros(len(hashes), dtype=bool)
    first[np.unique(hashes, return_index=True)[1]] = True
    bounds = np.cumsum([0] + [len(usable[s]) for s in order])
    return {s: usable[s][first[start:end]] for s, start, end in zip(order, bounds[:-1], bounds[1:], strict=True)}


def carve_missing_splits(rows: dict[str, np.ndarray], args: DataArguments, seed: int) -> dict[str, tuple]:
    """Hold out validation and test dialogues from train (seeded) when the source has no such split.

    Returns for each split the source split its dialogues come from and their rows there.
    """
    train = rows["train"]
    shares = {"test": args.test_size, "validation": args.val_size}
    sizes = {s: math.ceil(len(train) * share) for s, share in shares.items() if s not in rows and share > 0}
    order = np.random.default_rng(seed).permutation(len(train))
    out, start = {split: (split, split_rows) for split, split_rows in rows.items()}, 0
    for split, size in sizes.items():
        out[split] = ("train", np.sort(train[order[start : start + size]]))
        start += size
    if start:
        out["train"] = ("train", np.sort(train[order[start:]]))
    return {split: out.get(split, ("train", train[:0])) for split in SPLITS}


def batches_of(table: pa.Table, rows: np.ndarray):
    """The given rows of a table, taken a batch at a time."""
    for start in range(0, len(rows), WRITE_BATCH_ROWS):
        yield table.take(rows[start : start + WRITE_BATCH_ROWS])


def write_arrow(path: Path, schema: pa.Schema, tables) -> Dataset:
    """Write tables one after the other to an Arrow file and open it memory-mapped."""
    with pa.ipc.new_stream(str(path), schema) as out:
        for table in tables:
            out.write_table(table)
    return Dataset.from_file(str(path))


def subset(count: int, limit: int | None, seed: int) -> np.ndarray:
    """Rows to keep of `count`: all, or a seeded random choice of `limit`, in order."""
    if limit is None or count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, limit, replace=False))


def collect_samples(cleaned: Dataset, rows: np.ndarray, features: Features, path: Path) -> Dataset:
    """One row per sample of the dialogues in `rows`, taken and flattened in Arrow."""
    batches = batches_of(cleaned.data.table.select(["samples"]), rows)
    return write_arrow(path, features.arrow_schema, map(flatten_samples, batches))


def move_samples(samples: Dataset, limit: int | None, seed: int, path: Path) -> None:
    """Move the samples' Arrow file to `path`, or write a seeded random choice of `limit` of them there instead."""
    rows = subset(len(samples), limit, seed)
    if len(rows) == len(samples):
        os.replace(samples.cache_files[0]["filename"], path)
    else:
        write_arrow(path, samples.data.schema, batches_of(samples.data.table, rows))


def nothing_left(name: str, counts: dict, args: DataArguments) -> str:
    """Why no training sample is left: every filter with its count."""
    dropped, cut, held_out = counts["dropped_dialogues"], counts["cut_utterances"], counts["dialogues"]
    return (
        f"no training samples left from {name}: of {counts['dialogues_read']} dialogues, {dropped['malformed']} "
        f"were malformed, {dropped['too_short']} had fewer than two usable utterances and {dropped['duplicate']} "
        f"were duplicates; {cut['empty']} utterances were cut at empty ones and {cut['too_long']} at ones longer "
        f"than max_utterance_length={args.max_utterance_length}; {held_out['validation'] + held_out['test']} "
        "dialogues are in the validation and test splits"
    )


def prepare(args: DataArguments, seed: int, kind: str, path: Path | None, work: Path, out: Path) -> dict:
    """Read, clean, deduplicate, split and convert: `<split>.arrow` files in `out`, and what happened on the way."""
    seconds, clock = {}, time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        seconds[phase], clock = round(time.perf_counter() - clock, 2), time.perf_counter()

    source = read_source(args, kind, path, work)
    lap("read")
    cleaned = {split: clean_split(ds, split, source, args, work) for split, ds in source.splits.items()}
    counts = tally(cleaned)
    check_malformed(counts, source.name, args)
    lap("clean_and_convert")
    keep = first_copies(cleaned)
    dropped = counts["dropped_dialogues"]
    dropped["duplicate"] = counts["dialogues_read"] - dropped["malformed"] - dropped["too_short"]
    dropped["duplicate"] -= sum(len(rows) for rows in keep.values())
    dialogues = carve_missing_splits(keep, args, seed)
    counts["dialogues"] = {split: len(rows) for split, (_, rows) in dialogues.items()}
    lap("deduplicate_and_split")
    features = SAMPLE_FEATURES[sample_format(args, source.form)]
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples}
    for split, (origin, rows) in dialogues.items():
        collected = collect_samples(cleaned[origin], rows, features, work / f"samples-{split}.arrow")
        move_samples(collected, limits.get(split), seed, out / f"{split}.arrow")
    lap("collect_and_write")
    if not len(Dataset.from_file(str(out / "train.arrow"))):
        raise UserError(nothing_left(source.name, counts, args))
    found = source.found_format or source.form
    stats = {"dataset_name": source.name, "source_kind": source.kind, "chat_form": found != "dialogue", **counts}
    stats["data_format"] = found
    return {**stats, "seconds": seconds}
