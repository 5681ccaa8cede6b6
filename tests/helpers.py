"""Helpers shared by several test modules (fixtures stay in conftest)."""


def reply_tokens(messages: list[dict], tokenizer, max_length: int | None = None, last_only: bool = False) -> int:
    """Tokens of the replies and their end tokens, found in the rendered text by character offsets (not by any
    mask the code under test computes), among the first `max_length` tokens; with `last_only`, of the last reply."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, at = [], 0
    for message in messages:
        if message["role"] == "assistant":
            reply = f" {message['content'].strip()} {tokenizer.eos_token}"
            at = text.index(reply, at) + len(reply)
            spans.append((at - len(reply), at))
    spans = spans[-1:] if last_only else spans
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return sum(any(start <= begin < end for start, end in spans) for begin, _ in offsets[:max_length])
