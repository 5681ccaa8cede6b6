"""Character-level corpus BLEU-n, as the LCCC paper scores Chinese replies: sacrebleu with its `char` tokenizer.

evaluate.load("sft/evaluation/metrics/char_bleu").compute(predictions=["我爱你"], references=["我爱她"], max_order=2)
-> {"bleu": 57.7...}   # 0-100; whitespace is ignored, one reference per reply
"""

import datasets
import evaluate

_DESCRIPTION = "Corpus BLEU-n (0-100) over characters, whitespace left out, with sacrebleu's default smoothing."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of replies (str).
    references: list of reference replies (str), one per reply.
    max_order: the highest n-gram order (2 for BLEU-2, 4 for BLEU-4; default 4).
Returns:
    bleu: corpus BLEU on a 0-100 scale (0 for no replies).
"""


class CharBleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Wang et al., 2020, A Large-Scale Chinese Short-Text Conversation Dataset (LCCC)",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, max_order=4):
        from sacrebleu.metrics import BLEU

        if not predictions:
            return {"bleu": 0.0}
        scorer = BLEU(tokenize="char", max_ngram_order=max_order)
        return {"bleu": scorer.corpus_score(list(predictions), [list(references)]).score}
