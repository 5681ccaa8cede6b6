"""Users' own preference pairs, in the formats TRL and its peers read, as conversational prompt/chosen/rejected.

A JSON list or JSONL file of records, each one of:
- `prompt`, `chosen`, `rejected` as text: the prompt is one user message, the replies assistant messages;
- `prompt`, `chosen`, `rejected` conversational: `prompt` a list of messages, `chosen`/`rejected` lists of
  assistant messages (TRL's conversational preference format);
- `chosen` and `rejected` whole conversations only (implicit prompt): the shared leading messages are the prompt.
A record that fits none is malformed: counted, skipped up to `max_malformed_share`, refused above it, as SFT data is.
"""

import json
import logging
from pathlib import Path

from datasets import Dataset

from sft.common.errors import UserError
from sft.data.pipeline import check_malformed
from sft.data.records import MalformedRecord, messages_of, parse_record
from sft.preference.config import PreferenceArguments

logger = logging.getLogger(__name__)
MALFORMED_EXAMPLES = 3


def as_messages(value, role: str, field_name: str) -> list[dict]:
    """A text (one message of `role`) or a list of chat messages."""
    if isinstance(value, str):
        if not value.strip():
            raise MalformedRecord(f"`{field_name}` is empty")
        return [{"role": role, "content": value}]
    try:
        return messages_of(value)
    except MalformedRecord:
        raise MalformedRecord(f"`{field_name}` is neither text nor a list of messages") from None


def split_implicit_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Chosen and rejected conversations as (shared prompt, chosen reply, rejected reply)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def preference_pair(record) -> dict:
    """One record as {prompt, chosen, rejected} messages, or MalformedRecord saying why it is none."""
    if not isinstance(record, dict) or not {"chosen", "rejected"} <= record.keys():
        raise MalformedRecord("needs `chosen` and `rejected` (and `prompt` unless they are whole conversations)")
    chosen = as_messages(record["chosen"], "assistant", "chosen")
    rejected = as_messages(record["rejected"], "assistant", "rejected")
    if "prompt" in record:
        prompt = as_messages(record["prompt"], "user", "prompt")
    else:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        if not prompt:
            raise MalformedRecord("chosen and rejected conversations share no prompt")
    if prompt[-1]["role"] == "assistant":
        raise MalformedRecord("the prompt ends with an assistant message: nothing to reply to")
    if any(m["role"] != "assistant" for m in chosen + rejected):
        raise MalformedRecord("chosen and rejected must be assistant replies")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def raw_records(path: Path) -> tuple[list, str]:
    """The records of a JSON list (already parsed) or of a JSONL file (lines, parsed one by one)."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text), "typed"
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    return [line for line in text.splitlines() if line.strip()], "json"


def load_pairs(path: str | Path, preference: PreferenceArguments) -> Dataset:
    """A pair file as a conversational preference dataset; malformed records skipped up to the ceiling."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pairs file not found: {path}")
    records, record_format = raw_records(path)
    pairs, problems = [], []
    for number, raw in enumerate(records, 1):
        try:
            pairs.append(preference_pair(parse_record(raw, record_format)))
        except MalformedRecord as err:
            problems.append(f"record {number}: {err}")
    counts = {
        "dialogues_read": len(records),
        "dropped_dialogues": {"malformed": len(problems)},
        "malformed_examples": problems[:MALFORMED_EXAMPLES],
    }
    check_malformed(counts, str(path), preference)
    return Dataset.from_list(pairs)
