"""Does a model stop, and does it loop? Never-stopped share, loop share and repeated-n-gram rate of replies.

evaluate.load("sft/evaluation/metrics/reply_loops").compute(predictions=["好的好的好的", "好"], stopped=[False, True])
-> {"no_stop_rate": 0.5, "loop_rate": 0.5, "repeated_ngram_rate": 0.3, ...}

Definitions (characters, whitespace left out, n = 4 unless `n` says otherwise):
- a reply *loops* when one character n-gram occurs `min_repeats` (3) or more times in it (overlaps count);
- a reply's *repeated-n-gram rate* is the share of its n-grams that repeat an earlier n-gram of the same reply,
  1 - distinct / all (0 for a reply shorter than n);
- a reply *never stopped* when it ran into max_new_tokens without the end-of-turn token (`stopped` is False).
"""

from collections import Counter

import datasets
import evaluate

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of replies (str).
    stopped: optional list of bool, per reply: whether it ended with the end-of-turn token.
    n: the character n-gram length (default 4).
    min_repeats: occurrences of one n-gram that make a loop (default 3).
Returns:
    loop_rate: share of replies that loop.
    repeated_ngram_rate: mean over replies of their repeated-n-gram rate.
    no_stop_rate: share of replies that never stopped (only when `stopped` is given).
    loops, repeated_ngram_rates: the per-reply values, in the order of the replies.
"""


def character_ngrams(text: str, n: int) -> list[str]:
    chars = "".join(text.split())
    return [chars[i : i + n] for i in range(len(chars) - n + 1)]


def repeated_ngram_rate(text: str, n: int) -> float:
    grams = character_ngrams(text, n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def loops(text: str, n: int, min_repeats: int) -> bool:
    counts = Counter(character_ngrams(text, n))
    return bool(counts) and max(counts.values()) >= min_repeats


class ReplyLoops(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, stopped=None, n=4, min_repeats=3):
        count = max(len(predictions), 1)
        flags = [loops(text, n, min_repeats) for text in predictions]
        rates = [repeated_ngram_rate(text, n) for text in predictions]
        scores = {"loop_rate": sum(flags) / count, "repeated_ngram_rate": sum(rates) / count}
        if stopped is not None:
            if len(stopped) != len(predictions):
                raise ValueError(f"{len(stopped)} `stopped` flags for {len(predictions)} replies")
            scores["no_stop_rate"] = sum(not s for s in stopped) / count
        return {**scores, "loops": flags, "repeated_ngram_rates": rates}
