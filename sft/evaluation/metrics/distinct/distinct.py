"""Distinct-n (Li et al., 2016) at character level: distinct n-grams / all n-grams over all replies.

evaluate.load("sft/evaluation/metrics/distinct").compute(predictions=["哈哈哈", "哈哈 好"])
-> {"distinct_1": 0.333..., "distinct_2": 0.5, "avg_len": 3.0}
"""

import datasets
import evaluate

_DESCRIPTION = "Distinct-n over the characters of all replies (whitespace left out), and the mean reply length."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of replies (str).
    orders: the n-gram orders to report (default (1, 2)).
Returns:
    distinct_<n>: distinct / all character n-grams over all replies (0 when there are none).
    avg_len: mean reply length in characters, whitespace left out.
"""


def characters(text: str) -> list[str]:
    return [char for char in text if not char.isspace()]


class Distinct(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Li et al., 2016, A Diversity-Promoting Objective Function for Neural Conversation Models",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, orders=(1, 2)):
        replies = [characters(text) for text in predictions]
        scores = {}
        for n in orders:
            grams = [tuple(chars[i : i + n]) for chars in replies for i in range(len(chars) - n + 1)]
            scores[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
        scores["avg_len"] = sum(map(len, replies)) / len(replies) if replies else 0.0
        return scores
