"""The replies a corpus repeats most: LCCC's generic replies ("哈哈", "好的", "我也是"), found from the data.

The one place that says which replies of a data set are generic: `make eval`'s generic-reply rate and the
preference stage's mined pairs both read it.
"""

from collections import Counter
from collections.abc import Iterable


def reply_key(text: str) -> str:
    """How replies are compared: white space left out (LCCC's raw text separates words with spaces)."""
    return "".join(text.split())


def most_frequent_replies(conversations: Iterable[list[dict]], top: int = 20, min_count: int = 2) -> list[list]:
    """The `top` assistant replies (as `reply_key`) seen at least `min_count` times, with their counts."""
    counts = Counter(
        reply_key(message["content"])
        for messages in conversations
        for message in messages
        if message["role"] == "assistant"
    )
    counts.pop("", None)
    return [[reply, count] for reply, count in counts.most_common(top) if count >= min_count]
