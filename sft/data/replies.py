"""The replies a corpus repeats most: LCCC's generic replies ("哈哈", "好的", "我也是"), found from the data."""

from collections import Counter
from collections.abc import Iterable


def most_frequent_replies(conversations: Iterable[list[dict]], top: int = 20, min_count: int = 2) -> list[str]:
    """The `top` assistant replies that occur most often (at least `min_count` times) in chat-form conversations."""
    counts = Counter(
        message["content"].strip()
        for messages in conversations
        for message in messages
        if message["role"] == "assistant" and message["content"].strip()
    )
    return [reply for reply, count in counts.most_common(top) if count >= min_count]
