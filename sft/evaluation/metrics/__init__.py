"""The LCCC reply metrics as Hugging Face `evaluate` modules kept in this folder, loaded from local files.

Each module is a folder holding one script of the same name, which `evaluate.load` takes as a local module
(offline, nothing fetched): `evaluate.load("sft/evaluation/metrics/char_bleu")`, `.../distinct`, `.../reply_loops`.
"""

import functools
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


@functools.cache
def load_metric(name: str):
    """One of this folder's `evaluate` modules, loaded from its local script."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def score_replies(
    texts: list[str], references: list[str], stopped: list[bool], generic: set[str] = frozenset()
) -> tuple[dict, dict]:
    """The report's reply metrics (BLEU-2/4, Distinct-1/2, length, stop, loop and generic-reply rates) and
    per-reply loop values; a reply is generic when it is one of `generic` (the training data's most frequent)."""
    if not texts:
        return {}, {"loops": [], "repeated_ngram_rates": []}
    bleu = load_metric("char_bleu")
    scores = {f"bleu_{n}": bleu.compute(predictions=texts, references=references, max_order=n)["bleu"] for n in (2, 4)}
    scores.update(load_metric("distinct").compute(predictions=texts))
    loops = load_metric("reply_loops").compute(predictions=texts, stopped=stopped)
    per_reply = {key: loops.pop(key) for key in ("loops", "repeated_ngram_rates")}
    generic_rate = sum(text.strip() in generic for text in texts) / len(texts)
    return {**scores, **loops, "generic_rate": generic_rate}, per_reply
