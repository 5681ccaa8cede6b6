"""One JSON document (an LCCC object or a list of dialogues) read a dialogue at a time into Arrow files.

The reader is our own on top of `json`'s C decoder: ijson 3.4 (yajl2_c backend) read the same 300k-dialogue file
about half as fast (see the README's data section), so it stays.
"""

import itertools
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, Features, Value

from sft.common.config import DataArguments
from sft.common.errors import UserError
from sft.data.files import open_text, unreadable_as_user_error
from sft.data.formats import as_messages, record_form
from sft.data.records import (
    CHAT_FIELD,
    MESSAGES,
    SPLIT_NAMES,
    UTTERANCES,
    WRITE_BATCH_ROWS,
    MalformedRecord,
    Source,
    utterances_of,
)

logger = logging.getLogger(__name__)


JSON_CHUNK_CHARS = 1 << 20
JSON_MAX_VALUE_CHARS = 1 << 24
_SPACE = re.compile(r"\s*")
_JSON = json.JSONDecoder()


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
            except RecursionError:
                self.fail("a value is nested too deeply to read")
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

    The format (dialogue, or chat messages in any of their formats) is judged on the first record; chat formats are
    converted to messages here. A record that does not parse is kept as an empty row with its problem, to be
    counted as malformed.
    """

    def __init__(self, folder: Path, field_name: str | None, data_format: str):
        self.folder, self.field_name, self.data_format = folder, field_name, data_format
        self.form, self.pending, self.writers = None, {}, {}

    @property
    def chat(self) -> bool:
        return self.form not in (None, "dialogue")

    @property
    def column(self) -> str:
        return CHAT_FIELD if self.chat else "dialog"

    def add(self, split: str, record) -> None:
        if self.form is None:
            self.form = record_form(record, self.field_name, self.data_format)
        try:
            if self.chat:
                body, problem = as_messages(record, self.form, self.field_name), None
            else:
                body, problem = utterances_of(record, self.field_name), None
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
    files = SplitFiles(work, args.dialogue_column, args.data_format)
    with unreadable_as_user_error(path), open_text(path) as stream:
        for split, record in json_document_items(JsonReader(stream, str(path)), args.max_samples):
            files.add(split, record)
    form = "messages" if files.chat else "dialogue"
    return Source(args.dataset_name, kind, files.datasets(), files.column, "typed", "item", form, files.form)
