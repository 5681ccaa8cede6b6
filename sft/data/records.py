"""What a record is: the raw line, list item or row of a source, and the dialogue or chat messages it holds."""

import json
from dataclasses import dataclass

from datasets import Dataset, List, Value

SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {"train": "train", "valid": "validation", "validation": "validation", "dev": "validation", "test": "test"}
DIALOGUE_FIELDS = ("dialog", "dialogue", "conversation", "utterances")
CHAT_FIELD = "messages"
ROLES = ("system", "user", "assistant")
WRITE_BATCH_ROWS = 10_000
UTTERANCES = List(Value("string"))
MESSAGES = List({"role": Value("string"), "content": Value("string")})


@dataclass
class Source:
    """Records per split, Arrow-backed, and how to read one."""

    name: str
    kind: str  # hub, lccc_json, json_list, jsonl, text, parquet
    splits: dict[str, Dataset]
    column: str | None  # the column holding the records; None: each row is one
    record_format: str  # json, tsv or typed
    location: str  # what a record is called in messages: line, item, row
    form: str = "dialogue"  # what the records in `column` are: dialogue, messages, alpaca or sharegpt
    found_format: str | None = None  # the source's own format when the reader already converted it to messages


class MalformedRecord(ValueError):
    """A record (line, list item or row) that holds no readable dialogue."""


def parse_record(raw, record_format: str):
    """The value of one record: a JSON text, a line of tab-separated utterances, or an already typed value."""
    if record_format == "json":
        try:
            return json.loads(raw.lstrip("\ufeff"))
        except json.JSONDecodeError as err:
            raise MalformedRecord(f"not valid JSON ({err.msg})") from None
        except RecursionError:
            raise MalformedRecord("nested too deeply to read") from None
    if record_format == "tsv":
        return raw.lstrip("\ufeff").split("\t")
    if raw is None:
        raise MalformedRecord("no dialogue")
    return raw


def list_in(record, field_name: str | None, fields: tuple, what: str) -> list:
    """A record that is a list, or the list an object holds under `field_name` or the first of `fields` it has."""
    if isinstance(record, dict):
        name = field_name or next((name for name in fields if name in record), None)
        if name not in record:
            raise MalformedRecord(f"no `{name or '`/`'.join(fields)}` field")
        record = record[name]
    if not isinstance(record, list):
        raise MalformedRecord(f"a {what} must be a list")
    return record


def utterances_of(record, field_name: str | None) -> list[str]:
    """The utterances of a record: a list of texts, or an object holding one under `field_name` or a known field."""
    record = list_in(record, field_name, DIALOGUE_FIELDS, "dialogue")
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
