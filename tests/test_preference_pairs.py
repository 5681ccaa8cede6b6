"""Preference pairs: each mining reason from a case built to trigger it and from no case built not to; users' pair
files in TRL's formats, malformed records counted and refused over the ceiling; the generic replies from the data."""

import json

import pytest

from sft.common.errors import UserError
from sft.data.replies import most_frequent_replies
from sft.evaluation.batch_generation import Reply
from sft.preference.config import PreferenceArguments
from sft.preference.mining import REASONS, make_pairs
from sft.preference.pair_files import load_pairs

GENERIC = {"哈哈", "好的"}
FINE = "周末去爬山吧，天气不错"
HUMAN = ["今天吃了火锅，很辣", "我在看一本科幻小说", "明天要早起上班", "这首歌我听了好多遍"]
# a reply built to trigger each reason, and one built to trigger none (its rejected reply is an unrelated one)
CASES = {
    "never_stopped": Reply(text="我觉得这个问题", tokens=64, stopped=False),
    "loop": Reply(text="好的好的好的好的好的好的", tokens=12, stopped=True),
    "generic": Reply(text="哈哈", tokens=2, stopped=True),
    "unrelated": Reply(text=FINE, tokens=10, stopped=True),
}


def context(i: int) -> list[dict]:
    return [{"role": "user", "content": f"第{i}个问题"}]


@pytest.mark.slow  # make_pairs loads eval's loop measure (an `evaluate` module): seconds
@pytest.mark.parametrize("reason", REASONS)
def test_each_reason_comes_from_the_case_built_for_it_only(reason):
    reply = CASES[reason]
    pairs, dropped = make_pairs([context(0), context(1)], HUMAN[:2], [reply, CASES["unrelated"]], GENERIC, seed=0)
    assert [p["reason"] for p in pairs] == [reason, "unrelated"]
    first = pairs[0]
    assert first["chosen"] == [{"role": "assistant", "content": HUMAN[0]}] and first["prompt"] == context(0)
    if reason == "unrelated":  # a fluent human reply of another dialogue, not the model's own
        assert first["rejected"][0]["content"] == HUMAN[1]
    else:
        assert first["rejected"][0]["content"] == reply.text
    assert sum(dropped.values()) == 0


@pytest.mark.slow  # make_pairs loads eval's loop measure (an `evaluate` module): seconds
def test_generic_or_looping_human_replies_never_stand_in_as_unrelated_ones():
    human = ["今天吃了火锅，很辣", "哈哈", "对对对对对对对对对对对对", "这首歌我听了好多遍"]
    replies = [CASES["unrelated"]] * 4
    pairs, dropped = make_pairs([context(i) for i in range(4)], human, replies, GENERIC, seed=1)
    rejected = {p["rejected"][0]["content"] for p in pairs}
    assert rejected <= {human[0], human[3]}
    assert dropped["chosen_generic"] == 1  # the generic human reply is not a chosen one


@pytest.mark.slow  # make_pairs loads eval's loop measure (an `evaluate` module): seconds
def test_a_rejected_reply_equal_to_the_chosen_one_is_dropped_and_counted():
    pairs, dropped = make_pairs([context(0)], ["哈哈哈哈"], [Reply("哈哈哈哈", 4, True)], set(), seed=0)
    assert not pairs and dropped["no_unrelated_reply"] + dropped["rejected_equals_chosen"] == 1


def test_the_most_frequent_replies_come_from_the_data():
    conversations = [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": reply}]
        for reply in ["嗯嗯", "嗯嗯", "嗯嗯", "我也是", "我也是", "一次"]
    ]
    assert [r for r, _ in most_frequent_replies(conversations, top=5)] == ["嗯嗯", "我也是"]
    assert [r for r, _ in most_frequent_replies(conversations, top=1)] == ["嗯嗯"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_users_pairs_in_each_format_become_conversational_pairs(tmp_path):
    user, good, bad = {"role": "user", "content": "你好"}, "你好呀，最近怎么样", "哈哈"
    records = [
        {"prompt": "你好", "chosen": good, "rejected": bad},
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        },
        {
            "chosen": [user, {"role": "assistant", "content": good}],
            "rejected": [user, {"role": "assistant", "content": bad}],
        },
    ]
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", records), PreferenceArguments(sft_run="x"))
    expected = {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }
    assert pairs.to_list() == [expected] * 3
    (tmp_path / "p.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    assert len(load_pairs(tmp_path / "p.json", PreferenceArguments(sft_run="x"))) == 3


def test_malformed_pairs_are_skipped_under_the_ceiling_and_refused_over_it(tmp_path):
    good = {"prompt": "你好", "chosen": "你好呀", "rejected": "哈哈"}
    records = [good] * 9 + [{"prompt": "你好", "chosen": "只有一个"}]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    assert len(load_pairs(path, PreferenceArguments(sft_run="x", max_malformed_share=0.2))) == 9
    with pytest.raises(UserError, match="1 of 10 records .* malformed.*record 10: needs `chosen` and `rejected`"):
        load_pairs(path, PreferenceArguments(sft_run="x", max_malformed_share=0.05))
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(UserError, match="record 11: not valid JSON"):
        load_pairs(path, PreferenceArguments(sft_run="x", max_malformed_share=0.05))


@pytest.mark.slow  # imports trl.experimental: seconds
def test_the_method_picks_trls_config_and_an_unknown_one_is_refused():
    from trl import DPOConfig
    from trl.experimental.orpo import ORPOConfig

    from sft.preference.config import parse_preference_recipe, training_config_class

    recipe = ["--config", "recipes/smoke_dpo.yaml"]
    assert training_config_class(recipe) is DPOConfig
    assert training_config_class([*recipe, "--method", "orpo"]) is ORPOConfig
    assert training_config_class([*recipe, "--method=orpo"]) is ORPOConfig
    with pytest.raises(UserError, match="invalid choice: 'kto'"):
        parse_preference_recipe([*recipe, "--method", "kto"])
