"""The LCCC reply metrics, as sft/evaluation/metrics' `evaluate` modules compute them, on replies worked out by hand."""

import math

import pytest
import sacrebleu

from sft.evaluation.metrics import METRICS_DIR, load_metric, score_replies


def bleu(replies: list[str], references: list[str], order: int) -> float:
    return load_metric("char_bleu").compute(predictions=replies, references=references, max_order=order)["bleu"]


def distinct(replies: list[str]) -> dict:
    return load_metric("distinct").compute(predictions=replies)


def reply_loops(replies: list[str], **kwargs) -> dict:
    return load_metric("reply_loops").compute(predictions=replies, **kwargs)


# --- Character BLEU (sacrebleu) and Distinct-n: the LCCC paper's metrics. -----------------------------------------


def test_bleu_2_by_hand():
    # 我爱你 vs 我爱她: unigrams 我,爱 of 3 match (2/3); bigrams 我爱 of 2 match (1/2); same length, no penalty.
    assert bleu(["我爱你"], ["我爱她"], 2) == pytest.approx(100 * math.sqrt(2 / 3 * 1 / 2))
    # 我爱 vs 我爱你: all n-grams match but the reply is short: brevity penalty exp(1 - 3/2).
    assert bleu(["我爱"], ["我爱你"], 2) == pytest.approx(100 * math.exp(1 - 3 / 2))


def test_corpus_bleu_4_by_hand():
    replies = ["今天天气很好", "我们去公园吧"]
    references = ["今天天气不错", "我们去公园玩吧"]
    # Matched / all character n-grams, both replies together:
    #   1-grams: 今天天气 (4 of 6) + 我们去公园吧 (6 of 6)            = 10/12
    #   2-grams: 今天 天天 天气 (3 of 5) + 我们 们去 去公 公园 (4 of 5) = 7/10
    #   3-grams: 今天天 天天气 (2 of 4) + 我们去 们去公 去公园 (3 of 4) = 5/8
    #   4-grams: 今天天气 (1 of 3) + 我们去公 们去公园 (2 of 3)         = 3/6
    # 12 reply characters against 13 reference characters: brevity penalty exp(1 - 13/12).
    penalty = math.exp(1 - 13 / 12)
    assert bleu(replies, references, 4) == pytest.approx(100 * penalty * (10 / 12 * 7 / 10 * 5 / 8 * 3 / 6) ** (1 / 4))
    assert bleu(replies, references, 2) == pytest.approx(100 * penalty * (10 / 12 * 7 / 10) ** (1 / 2))


def test_bleu_is_at_character_level_and_ignores_spaces():
    assert bleu(["我 爱 你"], ["我爱她"], 2) == bleu(["我爱你"], ["我 爱 她"], 2) == bleu(["我爱你"], ["我爱她"], 2)
    assert bleu(["完全不同"], ["毫无关系"], 4) == 0.0


def test_bleu_equals_sacrebleu_on_a_small_chinese_corpus():
    # sacrebleu's `zh` tokenizer splits Chinese text into characters, so on Chinese-only text it must agree.
    replies = ["哈哈，我也觉得。", "明天见！", "不会再煎糊了吧？", "你教了多久？", "真的假的"]
    references = ["是啊，我也这么觉得。", "好的，明天见。", "下次别煎糊了。", "教了多久啊？", "真的吗？"]
    for order in (2, 4):
        expected = sacrebleu.metrics.BLEU(tokenize="zh", max_ngram_order=order).corpus_score(replies, [references])
        assert bleu(replies, references, order) == pytest.approx(expected.score)


def test_distinct_and_length_by_hand():
    # characters 哈哈哈 + 哈哈好: 6 unigrams, 2 distinct (哈, 好); bigrams 哈哈 哈哈 + 哈哈 哈好: 4, 2 distinct.
    assert distinct(["哈哈哈", "哈哈 好"]) == pytest.approx({"distinct_1": 2 / 6, "distinct_2": 2 / 4, "avg_len": 3})
    assert distinct(["好"])["distinct_2"] == 0.0


# --- Stopping and looping. -----------------------------------------------------------------------------------------

REPLIES = ["好的好的好的好的", "你好", "哈哈哈哈哈", "我 爱 你 我爱你我爱你"]


def test_loops_and_repeated_ngram_rate_by_hand():
    result = reply_loops(REPLIES, stopped=[False, True, True, True])
    # 好的好的好的好的: 4-grams 好的好的 ×3 + 的好的好 ×2 = 5, 2 distinct: loops (one 4-gram 3 times), rate 3/5.
    # 你好: no 4-gram: no loop, rate 0.
    # 哈哈哈哈哈: 哈哈哈哈 ×2: rate 1/2, but twice is not a loop.
    # 我爱你我爱你我爱你 (spaces left out): 我爱你我 爱你我爱 你我爱你, twice each: rate 3/6, no loop.
    assert result["loops"] == [True, False, False, False]
    assert result["repeated_ngram_rates"] == pytest.approx([0.6, 0.0, 0.5, 0.5])
    assert result["loop_rate"] == pytest.approx(1 / 4)
    assert result["repeated_ngram_rate"] == pytest.approx((0.6 + 0.5 + 0.5) / 4)
    assert result["no_stop_rate"] == pytest.approx(1 / 4)
    # With 2-grams and two repeats counting as a loop, 哈哈哈哈哈 (哈哈 ×4) and the 我爱你 reply loop too.
    assert reply_loops(REPLIES, n=2, min_repeats=2)["loops"] == [True, False, True, True]
    assert "no_stop_rate" not in reply_loops(REPLIES)


def test_stop_flags_must_match_the_replies():
    with pytest.raises(ValueError, match="2 `stopped` flags for 4 replies"):
        reply_loops(REPLIES, stopped=[True, False])


def test_the_report_scores_replies_with_all_three_modules():
    scores, per_reply = score_replies(REPLIES, ["好的", "你好", "哈哈", "我爱你"], [False, True, True, True])
    assert set(scores) == {
        *("bleu_2", "bleu_4", "distinct_1", "distinct_2", "avg_len"),
        *("loop_rate", "repeated_ngram_rate", "no_stop_rate", "generic_rate"),
    }
    assert scores["no_stop_rate"] == 0.25 and per_reply["loops"] == [True, False, False, False]
    assert scores["generic_rate"] == 0.0  # no generic replies given


@pytest.mark.slow  # loads the three `evaluate` modules: seconds
def test_a_reply_is_generic_when_it_is_one_of_the_given_frequent_replies():
    scores, _ = score_replies(REPLIES, REPLIES, [True] * 4, generic={"你好", "好的"})
    assert scores["generic_rate"] == 0.25  # "你好" only: the whole reply is generic, not one holding "好的"
    assert score_replies([], [], []) == ({}, {"loops": [], "repeated_ngram_rates": []})


def test_each_module_is_a_local_script_evaluate_loads_offline(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("char_bleu", "distinct", "reply_loops"):
        assert (METRICS_DIR / name / f"{name}.py").is_file()
        module = evaluate.load(str(METRICS_DIR / name))
        assert isinstance(module, evaluate.Metric) and module.name == name
