"""The LCCC reply metrics as Hugging Face `evaluate` modules kept in this folder, loaded from local files.

Each module is a folder holding one script of the same name, which `evaluate.load` takes as a local module
(offline, nothing fetched): `evaluate.load("sft/evaluation/metrics/char_bleu")`, `.../distinct`, `.../reply_loops`,
and the Chinese chat diagnostics `.../generic_replies`, `.../language_drift` (its `system_prompt` configuration scores
the system-prompt probes), `.../reply_echo`, `.../self_repetition`.
"""

import functools
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


@functools.cache
def load_metric(name: str, config_name: str | None = None):
    """One of this folder's `evaluate` modules, loaded from its local script."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name), config_name)


def score_replies(texts: list[str], references: list[str], stopped: list[bool]) -> tuple[dict, dict]:
    """The report's reply metrics (BLEU-2/4, Distinct-1/2, length, stop and loop rates) and per-reply loop values."""
    if not texts:
        return {}, {"loops": [], "repeated_ngram_rates": []}
    bleu = load_metric("char_bleu")
    scores = {f"bleu_{n}": bleu.compute(predictions=texts, references=references, max_order=n)["bleu"] for n in (2, 4)}
    scores.update(load_metric("distinct").compute(predictions=texts))
    loops = load_metric("reply_loops").compute(predictions=texts, stopped=stopped)
    per_reply = {key: loops.pop(key) for key in ("loops", "repeated_ngram_rates")}
    return {**scores, **loops}, per_reply
