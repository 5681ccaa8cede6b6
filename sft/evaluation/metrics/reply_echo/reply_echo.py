"""Do replies echo the user? Share of replies that mostly copy the last user turn.

evaluate.load("sft/evaluation/metrics/reply_echo").compute(predictions=["你好吗", "我很好"], last_user=["你好吗", "嗨"])
-> {"echo_rate": 0.5, "overlaps": [1.0, 0.0], "echoes": [True, False]}

Characters are compared with whitespace left out. A reply's overlap is the share of its characters that lie in the
blocks it has in common with the last user turn (difflib's matching blocks, in order); a reply *echoes* when its
overlap is above `threshold` (0.5: more than half of the reply is copied). An empty reply echoes nothing.
"""

import difflib

import datasets
import evaluate

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of replies (str).
    last_user: per reply, the last user turn of its context (str).
    threshold: the overlap above which a reply echoes (default 0.5).
Returns:
    echo_rate: share of replies that echo.
    overlaps, echoes: per reply, its overlap and whether it echoes.
"""


def overlap(reply: str, user: str) -> float:
    """Share of the reply's characters copied, in order, from the user turn."""
    reply, user = "".join(reply.split()), "".join(user.split())
    if not reply:
        return 0.0
    blocks = difflib.SequenceMatcher(None, user, reply, autojunk=False).get_matching_blocks()
    return sum(block.size for block in blocks) / len(reply)


class ReplyEcho(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, last_user, threshold=0.5):
        if len(last_user) != len(predictions):
            raise ValueError(f"{len(last_user)} user turns for {len(predictions)} replies")
        overlaps = [overlap(reply, user) for reply, user in zip(predictions, last_user, strict=True)]
        echoes = [value > threshold for value in overlaps]
        return {"echo_rate": sum(echoes) / max(len(predictions), 1), "overlaps": overlaps, "echoes": echoes}
