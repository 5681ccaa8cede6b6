"""Local data files: their kind (from the name and the first line), gzip, and text that cannot be read."""

import contextlib
import gzip
import json
import zlib
from pathlib import Path

import pyarrow as pa
from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError

from sft.common.config import DataArguments
from sft.common.errors import UserError
from sft.data.formats import record_form
from sft.data.records import MalformedRecord, Source, parse_record

FILE_KINDS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "text",
    ".tsv": "text",
    ".parquet": "parquet",
}


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


UNREADABLE = (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error, pa.ArrowException)


@contextlib.contextmanager
def unreadable_as_user_error(path: Path):
    """Turn text that is not UTF-8, a broken gzip stream or a damaged parquet file into one clear message."""
    try:
        yield
    except DatasetGenerationError as err:
        if not isinstance(err.__cause__, UNREADABLE):
            raise
        raise UserError(unreadable(path, err.__cause__)) from None
    except UNREADABLE as err:
        raise UserError(unreadable(path, err)) from None


def unreadable(path: Path, err: Exception) -> str:
    if isinstance(err, pa.ArrowException):
        what = "a readable parquet file"
    else:
        what = "UTF-8 text" if isinstance(err, UnicodeDecodeError) else "a complete gzip file"
    return f"{path} is not {what} ({str(err).splitlines()[0]})"


def sniff_json(path: Path) -> str:
    """A .json file holds one document (an LCCC object or a list of dialogues) or one JSON value per line."""
    with unreadable_as_user_error(path), open_text(path) as stream:
        head = stream.read(1 << 16).lstrip()
    if not head:
        raise UserError(f"{path} is empty")
    first_line, _, rest = head.partition("\n")
    with contextlib.suppress(json.JSONDecodeError, RecursionError):  # a line nested too deep is judged below
        json.loads(first_line)
        if rest.strip():
            return "jsonl"
    if head[0] not in "{[":
        raise UserError(f"{path} is not JSON: expected a list or an object of dialogues, or one JSON value per line")
    return "lccc_json" if head[0] == "{" else "json_list"


def read_lines(args: DataArguments, kind: str, path: Path, work: Path) -> Source:
    """JSONL or tab-separated text: one record per line, parsed later by the cleaning workers."""
    with unreadable_as_user_error(path):
        lines = load_dataset("text", data_files=str(path), split="train", cache_dir=str(work))
    if kind == "text":
        return Source(args.dataset_name, kind, {"train": lines}, "text", "tsv", "line")
    form = "dialogue" if args.data_format == "auto" else args.data_format
    for raw in lines[:100]["text"]:  # the format is judged on the first record that parses
        with contextlib.suppress(MalformedRecord):
            form = record_form(parse_record(raw, "json"), args.dialogue_column, args.data_format)
            break
    return Source(args.dataset_name, kind, {"train": lines}, "text", "json", "line", form)
