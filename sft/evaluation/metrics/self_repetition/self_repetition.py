"""Does a model repeat itself across turns? Share of its replies in a dialogue that repeat one of its earlier ones.

evaluate.load("sft/evaluation/metrics/self_repetition").compute(
    predictions=["你好", "在干嘛", "你好！", "吃了"], dialogues=[0, 0, 0, 1])
-> {"self_repetition_rate": 0.5, "repeats": [False, False, True, False]}

`predictions` are the model's replies, each dialogue's in turn order, `dialogues` says which dialogue each belongs
to. A reply *repeats* when, whitespace left out, its similarity to an earlier reply of the same dialogue (difflib's
ratio, 2 * matched characters / both lengths) is at least `threshold` (0.8). The rate counts the replies that have an
earlier reply (a dialogue's first reply cannot repeat), so it is repeating replies / (replies - dialogues).
"""

import difflib

import datasets
import evaluate

_KWARGS_DESCRIPTION = """
Args:
    predictions: the model's replies (str), each dialogue's in turn order.
    dialogues: per reply, the id of its dialogue.
    threshold: the similarity at which a reply repeats an earlier one (default 0.8).
Returns:
    self_repetition_rate: repeating replies / replies that follow an earlier reply of their dialogue.
    repeats: per reply, whether it repeats an earlier reply of its dialogue.
"""


def similarity(a: str, b: str) -> float:
    a, b = "".join(a.split()), "".join(b.split())
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


class SelfRepetition(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, dialogues, threshold=0.8):
        if len(dialogues) != len(predictions):
            raise ValueError(f"{len(dialogues)} dialogue ids for {len(predictions)} replies")
        earlier: dict = {}
        repeats = []
        for reply, dialogue in zip(predictions, dialogues, strict=True):
            before = earlier.setdefault(dialogue, [])
            repeats.append(any(similarity(reply, old) >= threshold for old in before))
            before.append(reply)
        followers = len(predictions) - len(earlier)
        return {"self_repetition_rate": sum(repeats) / followers if followers else 0.0, "repeats": repeats}
