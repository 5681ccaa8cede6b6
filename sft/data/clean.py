"""LCCC cleaning: undo segmentation spaces, cut dialogues at bad utterances; records cleaned as a `datasets` map."""

import hashlib
import itertools
import json
import re

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Features, List, Value

from sft.common.config import DataArguments
from sft.data.conversations import SAMPLE_FEATURES, dialogue_samples, sample_format
from sft.data.formats import as_messages
from sft.data.records import MalformedRecord, parse_record, utterances_of

_LATIN_DIGIT_OR_SPACE = re.compile(r"[A-Za-z0-9\s]")
_LATIN_OR_DIGIT = re.compile(r"[A-Za-z0-9]")


def normalize_utterance(text: str) -> str:
    """Undo LCCC's segmentation spaces: "你 好 啊 ！" -> "你好啊！", "2 1 万" -> "21万", "S E E D" -> "SEED".

    A space survives only between two Latin/digit words at least one of which is longer than one character,
    so "I love you" and "iPhone 12" keep theirs; segmented single letters and digits are joined again.
    """
    joined = text.replace(" ", "")
    if not _LATIN_DIGIT_OR_SPACE.search(joined):  # the common case: no Latin, no digits, no other white space
        return joined
    pieces = text.split()
    if not pieces:
        return ""
    out = [pieces[0]]
    for prev, piece in itertools.pairwise(pieces):
        latin_pair = _LATIN_OR_DIGIT.fullmatch(prev[-1]) and _LATIN_OR_DIGIT.fullmatch(piece[0])
        if latin_pair and (len(prev) > 1 or len(piece) > 1):
            out.append(" ")
        out.append(piece)
    return "".join(out)


def clean_utterances(utterances: list[str], max_length: int | None) -> tuple[list[str], str | None, int]:
    """Normalized utterances up to the first empty or over-long one: (kept, why the rest was cut, how many were cut).

    Dropping an utterance from the middle would pair the next one with a message it never answered, so the
    dialogue ends there instead.
    """
    kept = []
    for text in map(normalize_utterance, utterances):
        if not text or (max_length and len(text) > max_length):
            return kept, "empty" if not text else "too_long", len(utterances) - len(kept)
        kept.append(text)
    return kept, None, 0


def content_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's own `hash` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def clean_features(args: DataArguments, form: str) -> Features:
    """Columns of the cleaning map: the samples of each record, its hash, why it is dropped, cut utterances."""
    sample = SAMPLE_FEATURES[sample_format(args, form)]
    return Features(
        {
            "samples": List(dict(sample)),
            "hash": Value("int64"),
            "reason": Value("string"),
            "problem": Value("string"),
            "cut_empty": Value("int32"),
            "cut_long": Value("int32"),
        }
    )


def clean_record(raw, record_format: str, form: str, args: DataArguments) -> dict:
    """One record -> its samples, the hash of its clean content, why it is dropped, and cut utterance counts."""
    row = {"samples": [], "hash": 0, "reason": None, "problem": None, "cut_empty": 0, "cut_long": 0}
    if isinstance(raw, str) and not raw.strip():
        return {**row, "reason": "blank"}
    record = parse_record(raw, record_format)
    if form != "dialogue":
        messages = as_messages(record, form, args.dialogue_column)
        reason = None if any(m["role"] == "assistant" for m in messages) else "too_short"
        return {
            **row,
            "samples": [{"messages": messages}],
            "hash": content_hash(json.dumps(messages)),
            "reason": reason,
        }
    if record_format != "typed":
        record = utterances_of(record, args.dialogue_column)
    elif None in record:  # a typed column holds texts or nulls
        raise MalformedRecord("an utterance is not text")
    kept, cut, count = clean_utterances(record, args.max_utterance_length)
    row["hash"] = content_hash("\x1f".join(kept))
    if len(kept) < 2:
        row["reason"] = "too_short"
    else:
        row["samples"] = dialogue_samples(kept, args)
    if cut:
        row["cut_empty" if cut == "empty" else "cut_long"] = count
    return row


def clean_batch(batch: dict, indices: list[int], *, column, record_format: str, form: str, location: str, args):
    """Clean a batch of records (a `datasets` map): one output row per record, dropped ones flagged.

    A record is the value of `column`, or the whole row when `column` is None (alpaca columns of a table).
    Returns an Arrow table, which `datasets` writes as it is: far faster than its encoding of nested lists.
    """
    features = clean_features(args, form)
    records = batch[column] if column else pa.Table.from_pydict(batch).to_pylist()
    out = {name: [] for name in features}
    problems = batch.get("problem") or [None] * len(indices)
    for raw, problem, index in zip(records, problems, indices, strict=True):
        try:
            if problem:  # found while reading a JSON document
                raise MalformedRecord(problem)
            row = clean_record(raw, record_format, form, args)
        except MalformedRecord as err:
            row = {"samples": [], "hash": 0, "reason": "malformed", "problem": f"{location} {index + 1}: {err}"}
            row.update(cut_empty=0, cut_long=0)
        for name, value in row.items():
            out[name].append(value)
    return pa.Table.from_pydict(out, schema=features.arrow_schema)


def flatten_samples(table: pa.Table) -> pa.Table:
    """One row per sample from the per-dialogue `samples` lists, in Arrow without making Python objects."""
    samples = pc.list_flatten(table.column("samples")).combine_chunks()
    return pa.Table.from_arrays(samples.flatten(), names=[column.name for column in samples.type])
