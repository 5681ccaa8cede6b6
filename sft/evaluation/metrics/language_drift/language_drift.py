"""Do replies drift out of the context's language? Latin letters after a context with none, and traditional
characters after a simplified context.

evaluate.load("sft/evaluation/metrics/language_drift").compute(predictions=["好ok"], contexts=["你好"])
-> {"latin_rate": 0.6667, "traditional_rate": 0.0, ...}

Characters are counted with whitespace left out. A character is Latin when its Unicode name says LATIN (ASCII and
full-width letters, accented letters). A character is traditional-only when OpenCC's traditional-to-simplified
character table (`t2s`) turns it into another character (說 -> 说; 后 and 的 stay). Over the replies whose context
holds no Latin letter, `latin_rate` is their Latin characters / all their characters; over the replies whose context
holds no traditional-only character, `traditional_rate` is their traditional-only characters / all their characters.

With `config_name="system_prompt"` it scores replies to the system-prompt probes instead:
evaluate.load("sft/evaluation/metrics/language_drift", "system_prompt").compute(predictions=["好的", "說得對"],
max_chars=10) -> {"compliance_rate": 0.5, "simplified_rate": 0.5, "short_rate": 1.0, "complies": [True, False]}
A reply is *simplified Chinese* when it holds a CJK character, no Latin letter and no traditional-only character;
it is *short* when it has at most `max_chars` characters; it *complies* when it is both.
"""

import functools
import unicodedata

import datasets
import evaluate

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of replies (str).
    contexts: per reply, the text of its context (str).
    max_chars (system_prompt): the most characters a short reply has (default 50).
Returns:
    latin_rate, traditional_rate: the drift rates defined above (0 when no reply counts).
    latin_shares, traditional_shares: per reply, its share of such characters (None when its context has them).
    (system_prompt) compliance_rate, simplified_rate, short_rate: shares of the replies; complies: per reply.
"""


@functools.cache
def traditional_to_simplified():
    import opencc

    return opencc.OpenCC("t2s")


@functools.cache
def is_latin(char: str) -> bool:
    return unicodedata.name(char, "").startswith(("LATIN", "FULLWIDTH LATIN"))


@functools.cache
def is_traditional_only(char: str) -> bool:
    return unicodedata.name(char, "").startswith("CJK") and traditional_to_simplified().convert(char) != char


def characters(text: str) -> str:
    return "".join(text.split())


def drift(predictions: list[str], contexts: list[str], is_foreign) -> tuple[float, list[float | None]]:
    """Foreign characters / all characters over the replies whose context holds none, and the per-reply shares."""
    foreign = total = 0
    shares = []
    for reply, context in zip(predictions, contexts, strict=True):
        if any(map(is_foreign, characters(context))):
            shares.append(None)
            continue
        chars = characters(reply)
        count = sum(map(is_foreign, chars))
        foreign, total = foreign + count, total + len(chars)
        shares.append(count / len(chars) if chars else 0.0)
    return (foreign / total if total else 0.0), shares


def simplified_chinese(text: str) -> bool:
    chars = characters(text)
    has_chinese = any(unicodedata.name(char, "").startswith("CJK") for char in chars)
    return has_chinese and not any(is_latin(char) or is_traditional_only(char) for char in chars)


def system_prompt_compliance(predictions: list[str], max_chars: int) -> dict:
    """Shares of the replies in simplified Chinese, short, and both."""
    count = max(len(predictions), 1)
    simple = [simplified_chinese(text) for text in predictions]
    short = [len(characters(text)) <= max_chars for text in predictions]
    complies = [a and b for a, b in zip(simple, short, strict=True)]
    return {
        "compliance_rate": sum(complies) / count,
        "simplified_rate": sum(simple) / count,
        "short_rate": sum(short) / count,
        "complies": complies,
    }


class LanguageDrift(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, contexts=None, max_chars=50):
        if self.config_name == "system_prompt":
            return system_prompt_compliance(predictions, max_chars)
        if contexts is None or len(contexts) != len(predictions):
            raise ValueError(f"language drift needs one context per reply ({len(predictions)} replies)")
        latin_rate, latin_shares = drift(predictions, contexts, is_latin)
        traditional_rate, traditional_shares = drift(predictions, contexts, is_traditional_only)
        return {
            "latin_rate": latin_rate,
            "traditional_rate": traditional_rate,
            "latin_shares": latin_shares,
            "traditional_shares": traditional_shares,
        }
