"""The record formats: LCCC dialogues, chat messages, alpaca and ShareGPT; the last two become chat messages.

alpaca: `instruction` + optional `input` (joined with a blank line) is the user message, `output` the reply, with
optional `system` and `history` ([[instruction, output], ...]). ShareGPT: `conversations` (or `messages`) of
`from`/`value` (or `role`/`content`) messages. Turns with an empty side are dropped; a ShareGPT conversation that
does not alternate user and assistant is malformed, never reordered.
"""

from sft.data.records import CHAT_FIELD, MalformedRecord, list_in, messages_of

FORMATS = ("auto", "dialogue", "messages", "alpaca", "sharegpt")
ALPACA_FIELDS = ("instruction", "input", "output", "system", "history")
SHAREGPT_FIELDS = ("conversations", CHAT_FIELD)
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}


def record_form(record, field_name: str | None, data_format: str) -> str:
    """The format of a record: the one forced by `data_format`, or the one its fields show."""
    if data_format != "auto":
        return data_format
    if not isinstance(record, dict):
        return "dialogue"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if field_name in (None, "conversations") and "conversations" in record:
        return "sharegpt"
    messages = record.get(CHAT_FIELD)
    if field_name in (None, CHAT_FIELD) and isinstance(messages, list):
        return "sharegpt" if messages and isinstance(messages[0], dict) and "from" in messages[0] else "messages"
    return "dialogue"


def text_of(record: dict, name: str, required: bool = False) -> str:
    value = record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise MalformedRecord(f"`{name}` is {'missing' if value is None else 'not text'}")
    return value


def turns_as_messages(system: str, turns) -> list[dict]:
    """A system message (when given) and the user/assistant turns whose both sides hold text."""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for user, reply in turns:
        if user.strip() and reply.strip():
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def alpaca_messages(record) -> list[dict]:
    """An alpaca record as chat messages."""
    if not isinstance(record, dict):
        raise MalformedRecord("an alpaca record must be an object")
    prompt = "\n\n".join(part for part in (text_of(record, "instruction", True), text_of(record, "input")) if part)
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair) for pair in history
    ):
        raise MalformedRecord("`history` must be a list of [instruction, output] pairs")
    return turns_as_messages(text_of(record, "system"), [*history, (prompt, text_of(record, "output", True))])


def sharegpt_messages(record, field_name: str | None) -> list[dict]:
    """A ShareGPT conversation as chat messages; one that does not alternate user and assistant is malformed."""
    conversation = list_in(record, field_name, SHAREGPT_FIELDS, "conversation")
    system, spoken = "", []
    for number, message in enumerate(conversation, 1):
        if not isinstance(message, dict):
            raise MalformedRecord(f"message {number} is not an object")
        speaker, text = message.get("from", message.get("role")), message.get("value", message.get("content"))
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise MalformedRecord(f"message {number} has the unknown role {speaker!r}")
        if not isinstance(text, str):
            raise MalformedRecord(f"message {number} holds no text")
        if role == "system" and number == 1:
            system = text
            continue
        expected = "assistant" if len(spoken) % 2 else "user"
        if role != expected:
            raise MalformedRecord(f"message {number} is from the {role} where the {expected} speaks: not alternating")
        spoken.append(text)
    return turns_as_messages(system, zip(spoken[::2], spoken[1::2], strict=False))


def as_messages(record, form: str, field_name: str | None) -> list[dict]:
    """The chat messages of a record in the messages, alpaca or ShareGPT format."""
    if form == "alpaca":
        return alpaca_messages(record)
    if form == "sharegpt":
        return sharegpt_messages(record, field_name)
    return messages_of(record)
