"""Dialogues from any source -> cleaned chat samples for SFTTrainer, prepared once and cached.

Sources: the Hub (`thu-coai/lccc` through the Hub's parquet conversion, or any dataset with a dialogue column) and
local files: LCCC JSON (`{"train": [...], "valid": [...], "test": [...]}`), a JSON list of dialogues, JSONL, text
with one dialogue per line and tab-separated utterances (each of them optionally gzip-compressed) and parquet.
A dialogue is a list of utterances, or an object holding one; rows already in chat form (`messages` of
`role`/`content`) pass through untouched.

Records are kept as Arrow data on disk from the moment they are read, and cleaning runs as a `datasets` map (with
`num_proc` workers for large data) that also builds each dialogue's samples; after deduplication and splitting an
Arrow-only pass gives one row per sample. LCCC-large (12M dialogues) is so prepared without holding it in memory.
The result lives in `<processed_dir>/<name>-<key>/`, where the key hashes the data arguments, the seed, the source
file and this module, and is reused while they stay the same. `python -m sft.data` prepares data alone and adds
token statistics to the folder's `stats.json`.
"""

import contextlib
import dataclasses
import gzip
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError
from filelock import FileLock
from trl.data_utils import common_prefix_length

from sft.cli import did_you_mean, parse_arguments, take_recipe
from sft.config import RECIPE_DATACLASSES, DataArguments, training_default
from sft.errors import LOG_FORMAT, UserError, exits_cleanly_on_user_error

logger = logging.getLogger(__name__)

LCCC_HUB_ID = "thu-coai/lccc"
PARQUET_REVISION = "refs/convert/parquet"
SPLITS = ("train", "validation", "test")
# Split names found in sources -> the names the rest of the project uses.
SPLIT_NAMES = {"train": "train", "valid": "validation", "validation": "validation", "dev": "validation", "test": "test"}
DIALOGUE_FIELDS = ("dialog", "dialogue", "conversation", "utterances")
CHAT_FIELD = "messages"
ROLES = ("system", "user", "assistant")
FILE_KINDS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "text",
    ".tsv": "text",
    ".parquet": "parquet",
}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
STATS_FILE = "stats.json"
NOT_IN_CACHE_KEY = ("processed_dir", "num_proc", "max_malformed_share")
PARALLEL_FROM_ROWS = 50_000  # below this, starting worker processes costs more than it saves
MALFORMED_EXAMPLES = 5
WRITE_BATCH_ROWS = 10_000
JSON_CHUNK_CHARS = 1 << 20
JSON_MAX_VALUE_CHARS = 1 << 24
UTTERANCES = List(Value("string"))
MESSAGES = List({"role": Value("string"), "content": Value("string")})
SAMPLE_FEATURES = {
    "multi_turn": Features({"messages": MESSAGES}),
    "per_turn": Features({"prompt": MESSAGES, "completion": MESSAGES}),
}
_LATIN_DIGIT_OR_SPACE = re.compile(r"[A-Za-z0-9\s]")
_LATIN_OR_DIGIT = re.compile(r"[A-Za-z0-9]")
_SPACE = re.compile(r"\s*")
_UNSAFE_IN_NAME = re.compile(r"[^\w-]+")
_JSON = json.JSONDecoder()

# --- Cleaning ---------------------------------------------------------------------------------------------------


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


# --- Dialogues -> chat samples ---------------------------------------------------------------------------------


def alternating_messages(utterances: list[str], system_prompt: str | None) -> list[dict]:
    """Chat messages of consecutive utterances: the first speaker is the user and the speakers alternate."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return head + [{"role": "assistant" if i % 2 else "user", "content": text} for i, text in enumerate(utterances)]


def dialogue_to_samples(utterances: list[str], max_turns: int, system_prompt: str | None = None) -> list[dict]:
    """multi_turn: consecutive windows of at most `max_turns` turns, every reply a target exactly once.

    A turn is one user message and the reply to it; a last message without a reply is no turn and is left out.
    """
    end, step = len(utterances) - len(utterances) % 2, 2 * max_turns
    return [
        {"messages": alternating_messages(utterances[start : min(start + step, end)], system_prompt)}
        for start in range(0, end, step)
    ]


def per_turn_samples(utterances: list[str], max_turns: int, system_prompt: str | None = None) -> list[dict]:
    """per_turn: one sample per reply, with up to `max_turns - 1` earlier turns and the user message as prompt."""
    return [
        {
            "prompt": alternating_messages(utterances[max(0, reply - 2 * max_turns + 1) : reply], system_prompt),
            "completion": [{"role": "assistant", "content": utterances[reply]}],
        }
        for reply in range(1, len(utterances), 2)
    ]


SAMPLE_BUILDERS = {"multi_turn": dialogue_to_samples, "per_turn": per_turn_samples}


def dialogue_samples(utterances: list[str], args: DataArguments) -> list[dict]:
    """The samples of one clean dialogue; with `both_speakers`, also those of the dialogue shifted by one utterance."""
    build = SAMPLE_BUILDERS[args.sample_format]
    views = [utterances, utterances[1:]] if args.both_speakers else [utterances]
    return [sample for view in views for sample in build(view, args.max_turns, args.system_prompt)]


# --- Records: a raw line, list item or row -> clean samples -----------------------------------------------------


class MalformedRecord(ValueError):
    """A record (line, list item or row) that holds no readable dialogue."""


def parse_record(raw, record_format: str):
    """The value of one record: a JSON text, a line of tab-separated utterances, or an already typed value."""
    if record_format == "json":
        try:
            return json.loads(raw.lstrip("\ufeff"))
        except json.JSONDecodeError as err:
            raise MalformedRecord(f"not valid JSON ({err.msg})") from None
    if record_format == "tsv":
        return raw.lstrip("\ufeff").split("\t")
    if raw is None:
        raise MalformedRecord("no dialogue")
    return raw


def holds_chat(record, field_name: str | None) -> bool:
    """Whether a record is in chat form (`{"messages": [...]}`) rather than a dialogue of utterances."""
    return isinstance(record, dict) and CHAT_FIELD in record and field_name in (None, CHAT_FIELD)


def utterances_of(record, field_name: str | None) -> list[str]:
    """The utterances of a record: a list of texts, or an object holding one under `field_name` or a known field."""
    if isinstance(record, dict):
        name = field_name or next((name for name in DIALOGUE_FIELDS if name in record), None)
        if name not in record:
            raise MalformedRecord(f"no `{name or '`/`'.join(DIALOGUE_FIELDS)}` field")
        record = record[name]
    if not isinstance(record, list):
        raise MalformedRecord("a dialogue must be a list of utterances")
    if not all(isinstance(utterance, str) for utterance in record):
        raise MalformedRecord("an utterance is not text")
    return record


def messages_of(record) -> list[dict]:
    """Chat-form messages as given (only `role` and `content` are kept)."""
    messages = record.get(CHAT_FIELD) if isinstance(record, dict) else record
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
    ):
        raise MalformedRecord("`messages` must be a list of {role: system/user/assistant, content: text}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def clean_features(args: DataArguments, chat: bool) -> Features:
    """Columns of the cleaning map: the samples of each record, its hash, why it is dropped, cut utterances."""
    sample = SAMPLE_FEATURES["multi_turn" if chat else args.sample_format]
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


def clean_record(raw, record_format: str, chat: bool, args: DataArguments) -> dict:
    """One record -> its samples, the hash of its clean content, why it is dropped, and cut utterance counts."""
    row = {"samples": [], "hash": 0, "reason": None, "problem": None, "cut_empty": 0, "cut_long": 0}
    if isinstance(raw, str) and not raw.strip():
        return {**row, "reason": "blank"}
    record = parse_record(raw, record_format)
    if chat:
        messages = messages_of(record)
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


def clean_batch(batch: dict, indices: list[int], *, column: str, record_format: str, chat: bool, location: str, args):
    """Clean a batch of records (a `datasets` map): one output row per record, dropped ones flagged.

    Returns an Arrow table, which `datasets` writes as it is: far faster than its encoding of nested lists.
    """
    features = clean_features(args, chat)
    out = {name: [] for name in features}
    problems = batch.get("problem") or [None] * len(indices)
    for raw, problem, index in zip(batch[column], problems, indices, strict=True):
        try:
            if problem:  # found while reading a JSON document
                raise MalformedRecord(problem)
            row = clean_record(raw, record_format, chat, args)
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


# --- Sources ------------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """Records per split, Arrow-backed, and how to read one."""

    name: str
    kind: str  # hub, lccc_json, json_list, jsonl, text, parquet
    splits: dict[str, Dataset]
    column: str  # the column holding the records
    record_format: str  # json, tsv or typed
    location: str  # what a record is called in messages: line, item, row
    chat: bool = False


def locate_source(args: DataArguments) -> tuple[str, Path | None]:
    """The kind of source that `dataset_name` names: a local file of a known kind or a Hub dataset id."""
    name = args.dataset_name
    if not name:
        raise UserError("no data given: set `dataset_name` to a local data file or a Hub dataset id")
    path = Path(name).expanduser()
    if path.is_dir():
        raise UserError(f"{name} is a folder: give one data file (or a Hub dataset id)")
    if path.is_file():
        return file_kind(path), path
    if HUB_ID.fullmatch(name) and not data_suffix(path):
        return "hub", None
    raise UserError(f"data file not found: {name}")


def data_suffix(path: Path) -> str:
    """The data extension of a file name, under a `.gz`: "data.jsonl.gz" -> ".jsonl"."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes.pop()
    return suffixes[-1] if suffixes and suffixes[-1] in FILE_KINDS else ""


def file_kind(path: Path) -> str:
    """lccc_json, json_list, jsonl, text or parquet, from the file name and, for .json, the first line."""
    suffix = data_suffix(path)
    if not suffix or (suffix == ".parquet" and path.suffix == ".gz"):
        raise UserError(
            f"{path}: unknown kind of data file; use .json, .jsonl, .txt/.tsv (one dialogue per line, utterances "
            "separated by tabs) or .parquet; all but parquet may be gzip-compressed (.gz)"
        )
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty")
    return sniff_json(path) if FILE_KINDS[suffix] == "json" else FILE_KINDS[suffix]


def open_text(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8-sig")


UNREADABLE = (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error)


@contextlib.contextmanager
def reading(path: Path):
    """Turn text that is not UTF-8 or a broken gzip stream into one clear message."""
    try:
        yield
    except DatasetGenerationError as err:
        if not isinstance(err.__cause__, UNREADABLE):
            raise
        raise UserError(unreadable(path, err.__cause__)) from None
    except UNREADABLE as err:
        raise UserError(unreadable(path, err)) from None


def unreadable(path: Path, err: Exception) -> str:
    what = "UTF-8 text" if isinstance(err, UnicodeDecodeError) else "a complete gzip file"
    return f"{path} is not {what} ({err})"


def sniff_json(path: Path) -> str:
    """A .json file holds one document (an LCCC object or a list of dialogues) or one JSON value per line."""
    with reading(path), open_text(path) as stream:
        head = stream.read(1 << 16).lstrip()
    if not head:
        raise UserError(f"{path} is empty")
    first_line, _, rest = head.partition("\n")
    with contextlib.suppress(json.JSONDecodeError):
        json.loads(first_line)
        if rest.strip():
            return "jsonl"
    if head[0] not in "{[":
        raise UserError(f"{path} is not JSON: expected a list or an object of dialogues, or one JSON value per line")
    return "lccc_json" if head[0] == "{" else "json_list"


class JsonReader:
    """Walks one JSON document a value at a time, so a file of millions of dialogues is never in memory whole."""

    def __init__(self, stream, name: str):
        self.stream, self.name = stream, name
        self.text, self.pos, self.lines_before = "", 0, 0

    def _more(self) -> bool:
        chunk = self.stream.read(JSON_CHUNK_CHARS)
        if not chunk:
            return False
        self.lines_before += self.text.count("\n", 0, self.pos)
        self.text, self.pos = self.text[self.pos :] + chunk, 0
        return True

    def fail(self, message: str, pos: int | None = None):
        line = self.lines_before + self.text.count("\n", 0, self.pos if pos is None else pos) + 1
        raise UserError(f"{self.name} is not valid JSON at line {line}: {message}")

    def peek(self) -> str:
        """The next character that is not white space ("" at the end)."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or not self._more():
                return self.text[self.pos : self.pos + 1]

    def expect(self, char: str) -> None:
        if self.peek() != char:
            self.fail(f"expected {char!r}")
        self.pos += 1

    def value(self):
        """The next JSON value."""
        self.peek()
        while True:
            try:
                value, end = _JSON.raw_decode(self.text, self.pos)
                if end < len(self.text) or not self._more():  # a value that ends the buffer may go on
                    break
            except json.JSONDecodeError as err:
                if len(self.text) - self.pos > JSON_MAX_VALUE_CHARS or not self._more():
                    self.fail(err.msg, err.pos)
        self.pos = end
        return value

    def items(self, limit: int | None = None):
        """The items of the array that comes next (at most `limit`; the rest is read past)."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        for count in itertools.count():
            item = self.value()
            if limit is None or count < limit:
                yield item
            separator = self.peek()
            if separator not in (",", "]"):
                self.fail("expected ',' or ']' after a list item")
            self.pos += 1
            if separator == "]":
                return


def json_document_items(reader: JsonReader, limit: int | None):
    """(split, item) for every dialogue of an LCCC object `{"train": [...], ...}` or of a top-level list."""
    if reader.peek() == "[":
        yield from (("train", item) for item in reader.items(limit))
        return
    reader.expect("{")
    while reader.peek() != "}":
        key = reader.value()
        reader.expect(":")
        split = SPLIT_NAMES.get(key) if isinstance(key, str) else None
        if split is None:
            logger.warning("%s: ignoring `%s`, which is not a train/valid/test split", reader.name, key)
        if reader.peek() == "[":
            yield from ((split, item) for item in reader.items(limit) if split)
        elif split:
            reader.fail(f"`{key}` must be a list of dialogues")
        else:
            reader.value()
        if reader.peek() == ",":
            reader.pos += 1
    reader.expect("}")


class SplitFiles:
    """Dialogues of a JSON document, checked and written batch by batch to one Arrow file per split.

    The kind of record (utterance lists or chat messages) is judged on the first one; a record that is neither
    is kept as an empty row with its problem, to be counted as malformed.
    """

    def __init__(self, folder: Path, field_name: str | None):
        self.folder, self.field_name = folder, field_name
        self.chat, self.pending, self.writers = None, {}, {}

    @property
    def column(self) -> str:
        return CHAT_FIELD if self.chat else "dialog"

    def add(self, split: str, record) -> None:
        if self.chat is None:
            self.chat = holds_chat(record, self.field_name)
        try:
            body, problem = messages_of(record) if self.chat else utterances_of(record, self.field_name), None
        except MalformedRecord as err:
            body, problem = None, str(err)
        bodies, problems = self.pending.setdefault(split, ([], []))
        bodies.append(body)
        problems.append(problem)
        if len(bodies) >= WRITE_BATCH_ROWS:
            self._flush(split)

    def _flush(self, split: str) -> None:
        features = Features({self.column: MESSAGES if self.chat else UTTERANCES, "problem": Value("string")})
        if split not in self.writers:
            self.writers[split] = pa.ipc.new_stream(str(self.folder / f"read-{split}.arrow"), features.arrow_schema)
        bodies, problems = self.pending[split]
        self.writers[split].write_table(pa.table([bodies, problems], schema=features.arrow_schema))
        self.pending[split] = ([], [])

    def datasets(self) -> dict[str, Dataset]:
        for split in self.pending:
            self._flush(split)
        for writer in self.writers.values():
            writer.close()
        return {split: Dataset.from_file(str(self.folder / f"read-{split}.arrow")) for split in self.writers}


def read_json_document(args: DataArguments, kind: str, path: Path, work: Path) -> Source:
    """An LCCC JSON object or a JSON list of dialogues, read a dialogue at a time."""
    files = SplitFiles(work, args.dialogue_column)
    with reading(path), open_text(path) as stream:
        for split, record in json_document_items(JsonReader(stream, str(path)), args.max_samples):
            files.add(split, record)
    return Source(args.dataset_name, kind, files.datasets(), files.column, "typed", "item", bool(files.chat))


def read_lines(args: DataArguments, kind: str, path: Path, work: Path) -> Source:
    """JSONL or tab-separated text: one record per line, parsed later by the cleaning workers."""
    with reading(path):
        lines = load_dataset("text", data_files=str(path), split="train", cache_dir=str(work))
    if kind == "text":
        return Source(args.dataset_name, kind, {"train": lines}, "text", "tsv", "line")
    chat = False
    for raw in lines[:100]["text"]:  # the kind of record is judged on the first one that parses
        with contextlib.suppress(MalformedRecord):
            chat = holds_chat(parse_record(raw, "json"), args.dialogue_column)
            break
    return Source(args.dataset_name, kind, {"train": lines}, "text", "json", "line", chat)


def load_hub(args: DataArguments) -> DatasetDict:
    """A Hub dataset; LCCC is read from the Hub's parquet conversion, as its loading script no longer runs."""
    if args.dataset_name == LCCC_HUB_ID:
        where = {"data_dir": args.dataset_config or "base", "revision": PARQUET_REVISION}
    else:
        where = {"name": args.dataset_config}
    try:
        return load_dataset(args.dataset_name, **where)
    except (DatasetNotFoundError, ConnectionError, FileNotFoundError, ValueError) as err:
        raise UserError(f"could not load {args.dataset_name} from the Hub: {str(err).splitlines()[0]}") from None


def typed_column(ds: Dataset, name: str, wanted: str | None) -> tuple[str, bool]:
    """The dialogue column of a typed dataset, and whether it holds chat messages rather than utterance lists."""
    for column in [wanted] if wanted else [CHAT_FIELD, *DIALOGUE_FIELDS]:
        if column not in ds.features:
            continue
        inner = getattr(ds.features[column], "feature", None)
        if inner in (Value("string"), Value("large_string")):
            return column, False
        if isinstance(inner, dict) and {"role", "content"} <= inner.keys():
            return column, True
        raise UserError(f"column `{column}` of {name} is neither a list of texts nor a list of role/content messages")
    raise UserError(
        f"{name} has no dialogue column (looked for {wanted or ', '.join([CHAT_FIELD, *DIALOGUE_FIELDS])}; it has "
        f"{', '.join(ds.column_names)}): set `dialogue_column`"
    )


def read_typed(args: DataArguments, kind: str, path: Path | None, work: Path) -> Source:
    """A Hub dataset or a parquet file: typed columns, one of which holds the dialogues."""
    if kind == "hub":
        loaded = load_hub(args)
    else:
        loaded = {"train": load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(work))}
    splits = {}
    for split, ds in loaded.items():
        if split in SPLIT_NAMES:
            splits[SPLIT_NAMES[split]] = ds
        else:
            logger.warning("ignoring split `%s`: not a train, validation or test split", split)
    if not splits:
        raise UserError(f"{args.dataset_name} has no train, validation or test split")
    column, chat = typed_column(next(iter(splits.values())), args.dataset_name, args.dialogue_column)
    splits = {split: ds.select_columns([column]) for split, ds in splits.items()}
    return Source(args.dataset_name, kind, splits, column, "typed", "row", chat)


READERS = {
    "hub": read_typed,
    "parquet": read_typed,
    "jsonl": read_lines,
    "text": read_lines,
    "lccc_json": read_json_document,
    "json_list": read_json_document,
}


def read_source(args: DataArguments, kind: str, path: Path | None, work: Path) -> Source:
    """The records of every split of the source, Arrow-backed, at most `max_samples` per split."""
    source = READERS[kind](args, kind, path, work)
    if not source.splits:
        raise UserError(f"{source.name} holds no dialogues")
    if "train" not in source.splits:
        raise UserError(f"{source.name} has no train split (it has {', '.join(source.splits)})")
    if args.max_samples:
        source.splits = {s: ds.select(range(min(args.max_samples, len(ds)))) for s, ds in source.splits.items()}
    return source


# --- The pipeline -------------------------------------------------------------------------------------------------


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
        features=clean_features(args, source.chat),
        fn_kwargs={
            "column": source.column,
            "record_format": source.record_format,
            "chat": source.chat,
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


def keep_samples(samples: Dataset, limit: int | None, seed: int, path: Path) -> None:
    """Move the samples to `path`, or write a seeded random choice of `limit` of them there when there are more."""
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
    features = SAMPLE_FEATURES["multi_turn" if source.chat else args.sample_format]
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples}
    for split, (origin, rows) in dialogues.items():
        collected = collect_samples(cleaned[origin], rows, features, work / f"samples-{split}.arrow")
        keep_samples(collected, limits.get(split), seed, out / f"{split}.arrow")
    lap("collect_and_write")
    if not len(Dataset.from_file(str(out / "train.arrow"))):
        raise UserError(nothing_left(source.name, counts, args))
    stats = {"dataset_name": source.name, "source_kind": source.kind, "chat_form": source.chat, **counts}
    return {**stats, "seconds": seconds}


# --- The cache ----------------------------------------------------------------------------------------------------


def source_fingerprint(path: Path | None, args: DataArguments) -> list:
    """What identifies the source: a file's path, size and modification time, or a Hub id, config and revision."""
    if path is None:
        return [args.dataset_name, args.dataset_config, PARQUET_REVISION if args.dataset_name == LCCC_HUB_ID else None]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cache_folder(args: DataArguments, seed: int, path: Path | None) -> Path:
    """`<processed_dir>/<name>-<key>`; the key changes with any data argument, the seed, the source or this code."""
    identity = {
        "arguments": {k: v for k, v in dataclasses.asdict(args).items() if k not in NOT_IN_CACHE_KEY},
        "seed": seed,
        "source": source_fingerprint(path, args),
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    if path is None:
        stem = args.dataset_name.split("/")[-1] + (f"-{args.dataset_config}" if args.dataset_config else "")
    else:
        stem = path.name.split(".")[0]
    return Path(args.processed_dir) / f"{_UNSAFE_IN_NAME.sub('_', stem)}-{key}"


def prepared_folder(args: DataArguments, seed: int) -> Path:
    """The cache folder of these data arguments, prepared first when it does not exist yet."""
    kind, path = locate_source(args)
    folder = cache_folder(args, seed, path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):  # one process prepares, the others (other ranks, other runs) wait and reuse
        if (folder / STATS_FILE).is_file():
            logger.info("reusing the data prepared in %s", folder)
            return folder
        logger.info("preparing %s into %s", args.dataset_name, folder)
        scratch = folder.with_name(f"{folder.name}.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        for part in ("work", "data"):
            (scratch / part).mkdir(parents=True)
        try:
            stats = prepare(args, seed, kind, path, scratch / "work", scratch / "data")
            write_summary(scratch / "data", stats, args, seed)
            shutil.rmtree(folder, ignore_errors=True)  # without stats.json it is what an interrupted run left
            os.replace(scratch / "data", folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


def load_prepared(folder: Path) -> DatasetDict:
    """The splits of a cache folder, memory-mapped."""
    return DatasetDict({split: Dataset.from_file(str(folder / f"{split}.arrow")) for split in SPLITS})


def load_conversations(args: DataArguments, seed: int) -> DatasetDict:
    """Train/validation/test chat samples: prepared on first use, read back from the cache while nothing changed."""
    return load_prepared(prepared_folder(args, seed))


# --- Statistics ---------------------------------------------------------------------------------------------------


def utterance_counts(ds: Dataset) -> np.ndarray:
    """User and assistant messages per sample, counted on the Arrow columns without decoding rows."""
    counts = np.zeros(len(ds), dtype=np.int64)
    for name in set(ds.column_names) & {"messages", "prompt", "completion"}:
        offset = 0
        for chunk in ds.data.column(name).chunks:
            roles = pc.struct_field(pc.list_flatten(chunk), "role")
            spoken = pc.not_equal(roles, "system").to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(chunk).to_numpy()
            counts[offset : offset + len(chunk)] += np.bincount(parents[spoken], minlength=len(chunk))
            offset += len(chunk)
    return counts


def summary(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    return {
        "mean": round(float(values.mean()), 2),
        "p50": round(float(np.percentile(values, 50)), 1),
        "p95": round(float(np.percentile(values, 95)), 1),
        "max": int(values.max()),
    }


def write_stats(folder: Path, stats: dict) -> None:
    partial = folder / f"{STATS_FILE}.tmp"
    partial.write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(partial, folder / STATS_FILE)


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


def token_counts(sample: dict, tokenizer) -> tuple[int, int]:
    """Tokens of one sample as SFTTrainer builds it, and how many of them carry the loss."""
    conversation = sample.get("messages") or sample["prompt"] + sample["completion"]
    encoded = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, supervised = encoded["input_ids"], encoded["assistant_masks"]
    start = 0
    if sample.get("prompt"):  # per_turn: only the completion is a target, as in TRL's prompt/completion loss
        prompt = tokenizer.apply_chat_template(
            sample["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True
        )["input_ids"]
        start = common_prefix_length(prompt, ids)
    return len(ids), int(sum(supervised[start:]))


def token_summary(ds: Dataset, tokenizer, max_length: int | None, count: int, seed: int) -> dict:
    """Token lengths (p50/p95/max), the share `max_length` would truncate, and tokens per supervised token."""
    measured = ds.select(subset(len(ds), count, seed))
    if not len(measured):
        return {"samples_measured": 0}
    counts = np.array([token_counts(sample, tokenizer) for sample in measured])
    tokens, supervised = counts[:, 0], counts[:, 1]
    lengths = summary(tokens)
    return {
        "samples_measured": len(measured),
        "p50": lengths["p50"],
        "p95": lengths["p95"],
        "max": lengths["max"],
        "truncated_share": round(float((tokens > max_length).mean()), 4) if max_length else 0.0,
        "tokens_per_supervised_token": round(float(tokens.sum() / max(supervised.sum(), 1)), 3),
    }


# --- python -m sft.data -------------------------------------------------------------------------------------------


@dataclass
class PrepareArguments:
    """Options of `python -m sft.data` beside the data arguments; a recipe's seed, max_length and model are used."""

    output_dir: str | None = field(
        default=None,
        metadata={"help": "Folder for prepared data, one sub-folder per set of data arguments (./data/processed)."},
    )
    seed: int = field(
        default=training_default("seed"), metadata={"help": "Seed for carving validation/test splits and subsets."}
    )
    max_length: int | None = field(
        default=training_default("max_length"),
        metadata={"help": "Token limit of a training sample, for the truncation statistics."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model whose tokenizer and chat template measure the samples in tokens."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Revision of the model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the tokenizer's own code to run."})
    chat_template_path: str | None = field(default=None, metadata={"help": "Chat template file for training."})
    token_stats_samples: int = field(
        default=10_000, metadata={"help": "Samples per split tokenized for the token statistics (0: none)."}
    )


def parse_prepare_command(argv: list[str]) -> tuple[DataArguments, PrepareArguments]:
    """`--config recipe.yaml` plus flags (flags win); of the recipe, preparation uses what it needs."""
    recipe, args = take_recipe(argv)
    recipe_keys = {f.name for part in RECIPE_DATACLASSES for f in dataclasses.fields(part)}
    for key in recipe:
        if key not in recipe_keys:
            raise UserError(f"unknown recipe key `{key}`{did_you_mean(key, recipe_keys)}")
    recipe.pop("output_dir", None)  # the recipe's output_dir is training's
    data, command = parse_arguments(
        (DataArguments, PrepareArguments), args, recipe=recipe, ignore_unknown_keys=True, prog="python -m sft.data"
    ).values
    if command.output_dir:
        data.processed_dir = command.output_dir
    return data, command


def add_token_statistics(folder: Path, command: PrepareArguments) -> None:
    """Measure the prepared samples with the model's tokenizer and training template, into `stats.json`."""
    from sft.model import load_tokenizer

    try:
        tokenizer = load_tokenizer(
            command.model_name_or_path,
            revision=command.model_revision,
            trust_remote_code=command.trust_remote_code,
            chat_template_path=command.chat_template_path,
        )
    except UserError as err:
        logger.warning("token statistics skipped: %s", err)
        return
    stats = json.loads((folder / STATS_FILE).read_text(encoding="utf-8"))
    measure = dict(tokenizer=tokenizer, max_length=command.max_length, count=command.token_stats_samples)
    stats["tokens"] = {
        "tokenizer": command.model_name_or_path,
        "max_length": command.max_length,
        **{split: token_summary(ds, seed=command.seed, **measure) for split, ds in load_prepared(folder).items()},
    }
    write_stats(folder, stats)


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> Path:
    """Prepare the data of a recipe or of flags alone, and write `stats.json` next to it."""
    data, command = parse_prepare_command(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    folder = prepared_folder(data, command.seed)
    if command.model_name_or_path and command.token_stats_samples:
        add_token_statistics(folder, command)
    stats = json.loads((folder / STATS_FILE).read_text(encoding="utf-8"))
    logger.info(
        "%s: %d dialogues read, dropped %s, samples %s; statistics in %s",
        data.dataset_name,
        stats["dialogues_read"],
        stats["dropped_dialogues"],
        stats["samples"],
        folder / STATS_FILE,
    )
    return folder


if __name__ == "__main__":
    main()
