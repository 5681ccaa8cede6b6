"""The Chinese chat diagnostics (`evaluate` modules in sft/evaluation/metrics) on replies with known rates."""

import pytest

from sft.data.replies import most_frequent_replies
from sft.evaluation.diagnostics import answer_turn_by_turn
from sft.evaluation.metrics import load_metric


def conversation(*turns: str) -> list[dict]:
    roles = ["user", "assistant"] * len(turns)
    return [{"role": role, "content": text} for role, text in zip(roles, turns, strict=False)]


def test_most_frequent_replies_counts_replies_seen_twice_or_more():
    data = [
        conversation("a", "哈哈"),
        conversation("b", "哈 哈", "c", "好的"),
        conversation("d", "好的"),
        conversation("e", "嗯"),
    ]
    data.append(conversation("f", "哈哈"))
    assert most_frequent_replies(data, top=5) == [["哈哈", 3], ["好的", 2]]
    assert most_frequent_replies(data, top=1) == [["哈哈", 3]]


def test_generic_rate_and_top_generic_replies():
    scores = load_metric("generic_replies").compute(
        predictions=["哈哈", "我也想去", " 哈 哈", "好的"], generic=["哈哈", "好的", "嗯"]
    )
    assert scores["generic_rate"] == 0.75
    assert scores["generic"] == [True, False, True, True]
    assert scores["top"] == [["哈哈", 2], ["好的", 1]]


def test_latin_and_traditional_drift():
    scores = load_metric("language_drift").compute(
        predictions=["好ok", "說得對", "hi", "對"], contexts=["你好", "你好", "hello", "說吧"]
    )
    # Latin: contexts 1, 2 and 4 have no Latin letter: 2 Latin of 3 + 0 of 3 + 0 of 1 characters.
    assert scores["latin_rate"] == pytest.approx(2 / 7)
    assert scores["latin_shares"] == [pytest.approx(2 / 3), 0.0, None, 0.0]
    # Traditional: contexts 1-3 are simplified (說 in context 4 is traditional): 說 and 對 of 3 + 3 + 2 characters.
    assert scores["traditional_rate"] == pytest.approx(2 / 8)
    assert scores["traditional_shares"] == [0.0, pytest.approx(2 / 3), 0.0, None]


def test_system_prompt_probes_score_simplified_and_short_replies():
    scores = load_metric("language_drift", "system_prompt").compute(
        predictions=["好的", "說得對", "ok好", "很长很长很长很长很长的回复"], max_chars=10
    )
    assert scores["complies"] == [True, False, False, False]
    assert scores["compliance_rate"] == 0.25
    assert scores["simplified_rate"] == 0.5
    assert scores["short_rate"] == 0.75


def test_echo_rate_counts_replies_mostly_copying_the_user():
    scores = load_metric("reply_echo").compute(
        predictions=["你好吗", "我很好", "你好吗呀呀呀", "你好吗呀", ""],
        last_user=["你好吗", "嗨", "你好吗", "你好吗", "x"],
    )
    # Overlaps: 3/3, 0, 3/6 (not above 0.5), 3/4, empty.
    assert scores["overlaps"] == [1.0, 0.0, 0.5, 0.75, 0.0]
    assert scores["echoes"] == [True, False, False, True, False]
    assert scores["echo_rate"] == 0.4


def test_self_repetition_counts_replies_repeating_an_earlier_one_of_their_dialogue():
    scores = load_metric("self_repetition").compute(
        predictions=["你好", "在干嘛", "你好！", "吃了", "你好", "吃了"], dialogues=[0, 0, 0, 1, 1, 1]
    )
    # 你好！ is 0.8 similar to 你好; dialogue 1 repeats 吃了 but not 你好 (from another dialogue).
    assert scores["repeats"] == [False, False, True, False, False, True]
    assert scores["self_repetition_rate"] == 2 / 4


def test_dialogues_are_answered_turn_by_turn_with_the_models_own_replies():
    seen = []

    def generate(contexts):
        seen.append([list(context) for context in contexts])
        return [f"r{len(context)}" for context in contexts]

    dialogues = [conversation("a", "x", "b", "y", "c"), conversation("d", "z", "e")]
    assert answer_turn_by_turn(generate, dialogues) == [["r1", "r3", "r5"], ["r1", "r3"]]
    assert seen[1][0] == [*conversation("a", "r1"), {"role": "user", "content": "b"}]
    assert len(seen[2]) == 1
