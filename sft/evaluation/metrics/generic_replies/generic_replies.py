"""Are replies generic? Share of replies that are among the most frequent replies of the run's training data.

evaluate.load("sft/evaluation/metrics/generic_replies").compute(predictions=["哈哈", "我也想去"], generic=["哈哈"])
-> {"generic_rate": 0.5, "generic": [True, False], "top": [["哈哈", 1]]}

A reply is generic when, whitespace left out, it equals one of `generic` (the training data's most frequent replies,
`sft.data.replies.most_frequent_replies`). `top` lists the generic replies given, most frequent first.
"""

from collections import Counter

import datasets
import evaluate

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of replies (str).
    generic: the generic replies (str), e.g. the most frequent replies of the training data.
Returns:
    generic_rate: share of replies that are generic.
    generic: per reply, whether it is generic.
    top: [reply, count] of the generic replies among the predictions, most frequent first.
"""


def normalized(text: str) -> str:
    return "".join(text.split())


class GenericReplies(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, generic):
        known = {normalized(reply) for reply in generic}
        flags = [normalized(text) in known for text in predictions]
        counts = Counter(normalized(text) for text, flag in zip(predictions, flags, strict=True) if flag)
        return {
            "generic_rate": sum(flags) / max(len(predictions), 1),
            "generic": flags,
            "top": [[reply, count] for reply, count in counts.most_common()],
        }
