"""The data pipeline: every source kind, cleaning, conversations, splits, the cache, bad input and the CLI."""

import gzip
import json
import logging
import os
import shutil
import sys
from unittest import mock

import pytest
from datasets import Dataset, DatasetDict
from datasets.exceptions import DatasetNotFoundError
from helpers import reply_tokens, run_command
from transformers import AutoTokenizer

from sft.common.config import DataArguments
from sft.common.errors import UserError
from sft.common.model import load_tokenizer
from sft.data import (
    load_conversations,
    load_prepared,
    multi_turn_samples,
    normalize_utterance,
    per_turn_samples,
    pipeline,
    prepared_folder,
    sources,
)
from sft.data.__main__ import main
from sft.data.clean import clean_utterances
from sft.data.conversations import dialogue_samples
from sft.data.stats import token_counts


def make_dialogues(count: int = 30) -> list[list[str]]:
    """Distinct dialogues of 2 to 5 utterances in LCCC's char-segmented form ("第 1 2 段 第 0 句 话")."""
    return [[" ".join(f"第{i}段第{j}句话") for j in range(2 + i % 4)] for i in range(count)]


def expected_samples(dialogues, max_turns: int = 3) -> list[str]:
    clean = [[normalize_utterance(u) for u in d] for d in dialogues]
    return sorted(json.dumps(s, ensure_ascii=False) for d in clean for s in multi_turn_samples(d, max_turns))


def all_samples(datasets: DatasetDict) -> list[str]:
    return sorted(json.dumps(row, ensure_ascii=False) for split in datasets.values() for row in split)


def prepare(tmp_path, source, seed: int = 42, **options) -> tuple[DatasetDict, dict]:
    """Prepare `source` into a cache under tmp_path; the splits and stats.json."""
    args = DataArguments(dataset_name=str(source), processed_dir=str(tmp_path / "processed"), **options)
    folder = prepared_folder(args, seed)
    return load_prepared(folder), json.loads((folder / "stats.json").read_text(encoding="utf-8"))


def write_text(path, text: str):
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as out:
            out.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# --- Cleaning -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("你 好 啊 ！", "你好啊！"),
        ("2 1 万", "21万"),
        ("我 买 了 iPhone 12", "我买了iPhone 12"),  # word-segmented releases keep spaces between Latin words
        ("I love you", "I love you"),  # a single letter before a longer word keeps its space ...
        ("iPhone X", "iPhone X"),  # ... and after one
        ("Windows 7 系 统", "Windows 7系统"),
        ("COVID 19", "COVID 19"),
        ("S E E D", "SEED"),
        ("你\u3000好 \t 啊", "你好啊"),  # any white space, not only ASCII spaces
        ("   ", ""),
    ],
)
def test_normalize_utterance_rule(raw, clean):
    assert normalize_utterance(raw) == clean


def test_normalize_utterance_on_real_lccc_text(toy_data):
    """Real utterances of ../shared/lccc/toy_data.json, which is segmented character by character."""
    raw = json.loads(toy_data.read_text(encoding="utf-8"))
    utterances = [u for split in raw.values() for d in split for u in d]
    cases = {
        "遭 淋 安 逸 了": "遭淋安逸了？",
        "如 果 一 开 始 说 2 1 万": "如果一开始说21万，真的没什么好生气的，主要后面加了两次钱，",
        "所 以 我 只 想 问 问": "所以我只想问问你有没有买Mayday演唱会门票",
        "我 用 S E E D": "我用SEED.24小时签到一次可以用4小时，对于我这种每天晚上逛一下的感觉不错",
        "W h a t": "What?",
    }
    for start, clean in cases.items():
        assert normalize_utterance(next(u for u in utterances if u.startswith(start))) == clean
    for utterance in utterances:  # no space survives next to a Chinese character anywhere in the sample
        text = normalize_utterance(utterance)
        assert all(text[i - 1].isascii() and text[i + 1].isascii() for i, c in enumerate(text) if c == " ")


def test_a_dialogue_is_cut_at_its_first_empty_or_overlong_utterance():
    assert clean_utterances(["a b", "c", " ", "d", "e"], None) == (["ab", "c"], "empty", 3)
    assert clean_utterances(["a", "b c d e", "f"], 3) == (["a"], "too_long", 2)
    assert clean_utterances(["a", "b"], 3) == (["a", "b"], None, 0)


# --- Conversations ------------------------------------------------------------------------------------------------


def test_long_dialogues_become_windows_with_every_reply_a_target_once():
    utterances = [f"u{i}" for i in range(7)]
    samples = multi_turn_samples(utterances, max_turns=2, system_prompt="sys")
    windows = [[m["content"] for m in s["messages"]] for s in samples]
    assert windows == [["sys", "u0", "u1", "u2", "u3"], ["sys", "u4", "u5"]]
    assert [m["role"] for m in samples[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    replies = [m["content"] for s in samples for m in s["messages"] if m["role"] == "assistant"]
    assert replies == ["u1", "u3", "u5"]  # u6 has no reply: it is no turn


def test_per_turn_has_one_sample_per_reply_with_the_history_as_prompt():
    samples = per_turn_samples([f"u{i}" for i in range(6)], max_turns=2, system_prompt="sys")
    assert [s["completion"] for s in samples] == [[{"role": "assistant", "content": f"u{i}"}] for i in (1, 3, 5)]
    assert [m["content"] for m in samples[2]["prompt"]] == ["sys", "u2", "u3", "u4"]  # one earlier turn + the question
    assert [m["role"] for m in samples[2]["prompt"]] == ["system", "user", "assistant", "user"]


def test_both_speakers_makes_every_utterance_but_the_first_a_target():
    args = DataArguments(max_turns=3, both_speakers=True)
    samples = dialogue_samples(["a", "b", "c", "d"], args)
    replies = sorted(m["content"] for s in samples for m in s["messages"] if m["role"] == "assistant")
    assert replies == ["b", "c", "d"]
    assert samples[-1]["messages"][0] == {"role": "user", "content": "b"}


# --- Sources ------------------------------------------------------------------------------------------------------


def write_source(tmp_path, kind: str, suffix: str, dialogues):
    path = tmp_path / f"dialogues.{kind.split('_')[0]}{suffix}"
    if kind == "lccc_json":
        text = json.dumps({"train": dialogues[:20], "valid": dialogues[20:25], "test": dialogues[25:]}, indent=1)
    elif kind == "json_list":
        path = tmp_path / f"list.json{suffix}"
        text = json.dumps(dialogues, ensure_ascii=False, indent=1)
    elif kind == "jsonl":  # every form of a line: a list, or an object with `dialog` or `conversation`
        text = jsonl([d, {"dialog": d}, {"conversation": d}][i % 3] for i, d in enumerate(dialogues))
    else:
        path = tmp_path / f"toy_train.txt{suffix}"
        text = "".join("\t".join(d) + "\n" for d in dialogues)
    if kind == "lccc_json":
        path = tmp_path / f"lccc.json{suffix}"
    return write_text(path, text)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("kind", ["lccc_json", "json_list", "jsonl", "text"])
def test_every_local_source_kind_gives_the_same_samples(tmp_path, kind, suffix):
    dialogues = make_dialogues()
    datasets, stats = prepare(tmp_path, write_source(tmp_path, kind, suffix, dialogues))
    assert stats["source_kind"] == kind and stats["dialogues_read"] == len(dialogues)
    assert all_samples(datasets) == expected_samples(dialogues)
    if kind == "lccc_json":  # the file's own splits are kept
        assert stats["dialogues"] == {"train": 20, "validation": 5, "test": 5}


def test_parquet_with_a_dialogue_column(tmp_path):
    dialogues = make_dialogues()
    path = tmp_path / "dialogues.parquet"
    Dataset.from_dict({"id": list(range(len(dialogues))), "dialog": dialogues}).to_parquet(str(path))
    datasets, stats = prepare(tmp_path, path)
    assert stats["source_kind"] == "parquet"
    assert all_samples(datasets) == expected_samples(dialogues)


def test_chat_form_data_passes_through_untouched(tmp_path):
    head = [{"role": "system", "content": "s"}, {"role": "user", "content": "你 好"}]
    conversations = [[*head, {"role": "assistant", "content": f"{i}"}] for i in range(30)]
    path = write_text(tmp_path / "chat.jsonl", jsonl({"messages": c} for c in conversations))
    datasets, stats = prepare(tmp_path, path, system_prompt="ignored", sample_format="per_turn")
    assert stats["chat_form"] is True
    assert sorted(row["messages"][2]["content"] for split in datasets.values() for row in split) == sorted(
        c[2]["content"] for c in conversations
    )
    assert datasets["train"][0]["messages"][:2] == conversations[0][:2]  # spaces and system prompt as given


def lccc_hub(dialogues) -> DatasetDict:
    return DatasetDict(
        {
            "train": Dataset.from_dict({"dialog": dialogues[:20]}),
            "validation": Dataset.from_dict({"dialog": dialogues[20:25]}),
            "test": Dataset.from_dict({"dialog": dialogues[25:]}),
        }
    )


def test_lccc_from_the_hub_uses_its_parquet_conversion(tmp_path):
    dialogues = make_dialogues()
    with mock.patch.object(sources, "load_dataset", return_value=lccc_hub(dialogues)) as load:
        datasets, stats = prepare(tmp_path, "thu-coai/lccc", dataset_config="large")
    load.assert_called_once_with("thu-coai/lccc", data_dir="large", revision="refs/convert/parquet")
    assert stats["source_kind"] == "hub" and stats["dialogues"] == {"train": 20, "validation": 5, "test": 5}
    assert all_samples(datasets) == expected_samples(dialogues)


@pytest.mark.parametrize(("name", "config"), [("lccc-base", "base"), ("lccc", "large"), ("lccc-large", "large")])
def test_the_original_projects_names_are_the_hubs_lccc(tmp_path, name, config):
    dialogues = make_dialogues()
    with mock.patch.object(sources, "load_dataset", return_value=lccc_hub(dialogues)) as load:
        _, stats = prepare(tmp_path, name)
    load.assert_called_once_with("thu-coai/lccc", data_dir=config, revision="refs/convert/parquet")
    assert stats["dataset_name"] == "thu-coai/lccc" and stats["arguments"]["dataset_config"] == config


def test_an_lccc_name_with_another_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="lccc-base is LCCC-base: dataset_config cannot be large"):
        prepare(tmp_path, "lccc-base", dataset_config="large")


def test_any_hub_dataset_with_a_dialogue_column(tmp_path):
    dialogues = make_dialogues()
    loaded = DatasetDict({"train": Dataset.from_dict({"turns": dialogues, "topic": ["x"] * len(dialogues)})})
    with mock.patch.object(sources, "load_dataset", return_value=loaded) as load:
        datasets, _ = prepare(tmp_path, "someone/chats", dataset_config="zh", dialogue_column="turns")
    load.assert_called_once_with("someone/chats", name="zh")
    assert all_samples(datasets) == expected_samples(dialogues)


def test_hub_errors_are_one_clear_message(tmp_path):
    missing = DatasetNotFoundError("Dataset 'someone/nothing' doesn't exist on the Hub or cannot be accessed.")
    with mock.patch.object(sources, "load_dataset", side_effect=missing), pytest.raises(UserError) as err:
        prepare(tmp_path, "someone/nothing")
    assert str(err.value) == f"could not load someone/nothing from the Hub: {missing}"


# --- Cleaning, deduplication and splits at pipeline level --------------------------------------------------------


def test_drops_and_cuts_are_counted_by_reason(tmp_path):
    dialogues = make_dialogues(40)
    dialogues[0] = ["你 好", " ", "这 句 在 空 话 之 后"]  # cut at the empty utterance: too short afterwards
    dialogues[1] = ["一 二", "三 四", "太 长 了 的 一 句 话 真 的 很 长", "五"]  # cut at the long one: 2 are left
    dialogues[2] = ["只 有 一 句"]
    dialogues[3] = list(dialogues[10])  # an exact duplicate ...
    dialogues[4] = [u.replace(" ", "") for u in dialogues[11]]  # ... and one that is equal once cleaned
    path = write_text(tmp_path / "d.jsonl", jsonl(dialogues))
    datasets, stats = prepare(tmp_path, path, max_utterance_length=10)
    assert stats["dialogues_read"] == 40
    assert stats["dropped_dialogues"] == {"malformed": 0, "too_short": 2, "duplicate": 2}
    assert stats["cut_utterances"] == {"empty": 2, "too_long": 2}
    assert sum(stats["dialogues"].values()) == 36
    contents = [m["content"] for split in datasets.values() for row in split for m in row["messages"]]
    assert "一二" in contents and "五" not in contents and "这句在空话之后" not in contents


def test_a_duplicate_of_a_test_dialogue_never_stays_in_train(tmp_path):
    dialogues = make_dialogues()
    leaked = dialogues[27]  # in the test split
    path = write_text(tmp_path / "lccc.json", json.dumps({"train": dialogues[:20] + [leaked], "test": dialogues[20:]}))
    datasets, stats = prepare(tmp_path, path)
    assert stats["dropped_dialogues"]["duplicate"] == 1
    train = {json.dumps(row) for row in datasets["train"]}
    assert not train & {json.dumps(row) for row in datasets["test"]}


def test_missing_splits_are_carved_by_seed(tmp_path):
    dialogues = make_dialogues(100)
    path = write_text(tmp_path / "d.jsonl", jsonl(dialogues))
    first, stats = prepare(tmp_path, path, val_size=0.2, test_size=0.1)
    again, _ = prepare(tmp_path / "again", path, val_size=0.2, test_size=0.1)
    other, _ = prepare(tmp_path, path, seed=7, val_size=0.2, test_size=0.1)
    assert stats["dialogues"] == {"train": 70, "validation": 20, "test": 10}
    assert all_samples(first) == expected_samples(dialogues)  # every dialogue in exactly one split
    assert first["test"][:] == again["test"][:] and first["test"][:] != other["test"][:]


def test_held_out_splits_can_be_empty(tmp_path):
    path = write_text(tmp_path / "d.jsonl", jsonl(make_dialogues()))
    datasets, stats = prepare(tmp_path, path, val_size=0, test_size=0)
    assert stats["dialogues"] == {"train": 30, "validation": 0, "test": 0}
    assert len(datasets["validation"]) == 0 and datasets["validation"].column_names == ["messages"]


def test_sample_limits(tmp_path):
    path = write_text(tmp_path / "d.jsonl", jsonl(make_dialogues(100)))
    datasets, stats = prepare(tmp_path, path, max_train_samples=10, max_eval_samples=3, max_samples=60)
    assert stats["dialogues_read"] == 60
    assert (len(datasets["train"]), len(datasets["validation"])) == (10, 3)
    assert stats["samples"] == {"train": 10, "validation": 3, "test": len(datasets["test"])}
    folder = next((tmp_path / "processed").glob("*/stats.json")).parent  # nothing else is left behind
    assert sorted(p.name for p in folder.iterdir()) == ["stats.json", "test.arrow", "train.arrow", "validation.arrow"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, f"{folder.name}.lock"]


def test_workers_give_the_same_result_as_one_process(tmp_path):
    path = write_text(tmp_path / "d.jsonl", jsonl(make_dialogues(60)))
    alone, _ = prepare(tmp_path / "one", path, both_speakers=True)
    parallel, _ = prepare(tmp_path / "two", path, both_speakers=True, num_proc=2)
    assert [split[:] for split in alone.values()] == [split[:] for split in parallel.values()]


def test_real_lccc_sample_end_to_end(tmp_path, lccc_file):
    raw = json.loads(lccc_file.read_text(encoding="utf-8"))
    datasets, stats = prepare(tmp_path, lccc_file, system_prompt="你是一个友好的聊天伙伴。", sample_format="per_turn")
    assert stats["dialogues"] == {"train": len(raw["train"]), "validation": len(raw["valid"]), "test": len(raw["test"])}
    replies = sum(len(d) // 2 for split in raw.values() for d in split)
    assert sum(stats["samples"].values()) == replies  # per_turn: one sample per reply
    assert stats["utterances_per_sample"]["train"]["max"] <= 2 * 3  # max_turns 3: at most 6 utterances
    row = datasets["train"][0]
    assert row["prompt"][0]["role"] == "system" and row["completion"][0]["role"] == "assistant"


# --- The cache ----------------------------------------------------------------------------------------------------


def test_the_trainers_tokenization_caches_are_not_taken_for_splits(tmp_path):
    path = write_text(tmp_path / "d.jsonl", jsonl(make_dialogues()))
    folder = prepared_folder(DataArguments(dataset_name=str(path), processed_dir=str(tmp_path / "processed")), 42)
    shutil.copy(folder / "train.arrow", folder / "cache-0123abcd.arrow")  # as datasets writes when SFTTrainer maps
    assert list(load_prepared(folder)) == ["train", "validation", "test"]


def test_prepared_data_is_reused_until_an_argument_or_the_source_changes(tmp_path):
    path = write_text(tmp_path / "d.jsonl", jsonl(make_dialogues()))
    args = DataArguments(dataset_name=str(path), processed_dir=str(tmp_path / "processed"))
    first = load_conversations(args, seed=42)
    with mock.patch.object(pipeline, "read_source", side_effect=AssertionError("prepared again")):
        assert load_conversations(args, seed=42)["train"][:] == first["train"][:]
        args.num_proc = 2  # how, not what: the same data
        load_conversations(args, seed=42)
    args.max_turns = 1
    assert prepared_folder(args, 42) != prepared_folder(DataArguments(str(path), processed_dir=args.processed_dir), 42)
    os.utime(path, ns=(0, 0))
    folder = prepared_folder(args, 42)
    assert len(list((tmp_path / "processed").glob("*/stats.json"))) == 3
    (folder / "stats.json").unlink()  # as a run interrupted before the end leaves it
    assert (prepared_folder(args, 42) / "stats.json").is_file()


# --- Bad input ----------------------------------------------------------------------------------------------------


def test_a_few_malformed_lines_are_skipped_and_reported(tmp_path, caplog):
    lines = jsonl(make_dialogues(300)).splitlines()
    lines[4] = '["未 闭 合", '
    lines[9] = '["好", 3]'
    lines[20] = '{"text": "没 有 对 话"}'
    path = write_text(tmp_path / "d.jsonl", "\n".join(lines) + "\n\n")
    with caplog.at_level(logging.WARNING, logger="sft.data"):
        _, stats = prepare(tmp_path, path, max_malformed_share=0.05)
    assert stats["dialogues_read"] == 300 and stats["dropped_dialogues"]["malformed"] == 3
    assert stats["malformed_examples"] == [
        "line 5: not valid JSON (Expecting value)",
        "line 10: an utterance is not text",
        "line 21: no `dialog`/`dialogue`/`conversation`/`utterances` field",
    ]
    assert "skipped 3 malformed records of 300" in caplog.text


def test_bad_items_in_a_json_document_are_named_by_split_and_position(tmp_path):
    dialogues = make_dialogues(200)
    dialogues[7] = ["好", None]
    path = write_text(tmp_path / "lccc.json", json.dumps({"train": dialogues}))
    _, stats = prepare(tmp_path, path)
    assert stats["malformed_examples"] == ["train item 8: an utterance is not text"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.json", None, "data file not found: {path}"),
        ("empty.jsonl", "", "{path} is empty"),
        ("blank.json", "  \n", "{path} is empty"),
        ("table.csv", "a,b\n", "{path}: unknown kind of data file"),
        ("broken.json", '{"train": [["a", "b"], ["c", "d"]\n\n', "{path} is not valid JSON at line 3"),
        ("other.json", '{"data": [["a", "b"]]}', "{path} holds no dialogues"),
        ("bad.jsonl", jsonl([["a", "b"]] * 5) + "not json\n" * 5, "5 of 10 records in {path} are malformed (50.0%"),
        ("short.jsonl", jsonl([["只有一句"]] * 3), "no training samples left from {path}: of 3 dialogues, 0 were"),
        ("short.txt", "a\nb\tb\nb\tb\n", "1 had fewer than two usable utterances and 1 were duplicates"),
    ],
)
def test_bad_input_stops_with_one_clear_message(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as err:
        prepare(tmp_path, path)
    assert message.format(path=path) in str(err.value)


def test_text_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("你好\t再见\n".encode("gb18030"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        prepare(tmp_path, path)


def test_a_missing_file_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(UserError, match="data file not found: data/train.jsonl"):
        prepare(tmp_path, "data/train.jsonl")


# --- python -m sft.data -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_cli_prepares_a_recipe_and_writes_stats(tmp_path, tiny_model):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_model}\ndataset_name: sft/assets/lccc_sample.json\nmax_turns: 2\n"
        "max_length: 64\nlearning_rate: 1.0e-4\noutput_dir: output/not-for-data\nseed: 3\n",
        encoding="utf-8",
    )
    out = tmp_path / "processed"
    result = run_command(
        [sys.executable, "-m", "sft.data", "--config", str(recipe), "--output_dir", str(out), "--max_turns", "1"]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads(next(out.glob("*/stats.json")).read_text(encoding="utf-8"))
    assert stats["arguments"]["max_turns"] == 1 and stats["arguments"]["seed"] == 3  # flags win over the recipe
    assert stats["utterances_per_sample"]["train"] == {"mean": 2.0, "p50": 2.0, "p95": 2.0, "max": 2}
    tokens = stats["tokens"]["train"]
    assert tokens["samples_measured"] == stats["samples"]["train"]
    assert tokens["p50"] <= tokens["p95"] <= tokens["max"] and 0 <= tokens["truncated_share"] <= 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [m["content"] for row in load_prepared(next(out.glob("*/"))).get("train") for m in row["messages"]]
    spelled = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    assert tokens["characters_per_token"] == round(sum(map(len, texts)) / spelled, 3)
    assert "statistics in" in result.stderr


def test_token_counts_of_two_hand_made_dialogues(tiny_model):
    """Each sample's tokens and loss tokens against an independent count: the rendered text's tokens, and the
    tokens inside the replies found by character offsets (every reply for multi_turn, the completion for per_turn)."""
    tokenizer = load_tokenizer(str(tiny_model))
    dialogues = [
        ["你好啊", "你好！今天过得怎么样？", "还不错，去爬山了", "下次叫上我"],
        ["在吗", "在", "iPhone 12 好用吗", "拍照很好看"],
    ]
    for sample_format in ("multi_turn", "per_turn"):
        args = DataArguments(sample_format=sample_format, max_turns=2, system_prompt="你是一个友好的聊天伙伴。")
        samples = [sample for dialogue in dialogues for sample in dialogue_samples(dialogue, args)]
        assert len(samples) == (2 if sample_format == "multi_turn" else 4)
        for sample in samples:
            messages = sample.get("messages") or sample["prompt"] + sample["completion"]
            rendered = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
            tokens, supervised, characters, _ = token_counts(sample, tokenizer)
            assert tokens == len(rendered["input_ids"])
            assert supervised == reply_tokens(messages, tokenizer, last_only=sample_format == "per_turn")
            assert characters == sum(len(message["content"]) for message in messages)


def test_multi_turn_needs_fewer_tokens_per_supervised_token(tmp_path, lccc_file, tiny_model):
    ratios = {}
    for sample_format in ("multi_turn", "per_turn"):
        folder = main(
            [
                *("--dataset_name", str(lccc_file), "--output_dir", str(tmp_path), "--token_stats_samples", "400"),
                *("--model_name_or_path", str(tiny_model), "--sample_format", sample_format, "--max_length", "256"),
            ]
        )
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        ratios[sample_format] = stats["tokens"]["train"]["tokens_per_supervised_token"]
    assert 1 < ratios["multi_turn"] < ratios["per_turn"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset_name", "nope.json"], "error: data file not found: nope.json"),
        (["--max_turn", "2"], "error: unknown option `--max_turn` (did you mean `max_turns`?)"),
        (["--dataset_name", "x.json", "--max_turns", "0"], "max_turns must be at least 1"),
        (["--config"], "error: --config needs a recipe path"),
    ],
)
def test_cli_mistakes_exit_with_code_2_and_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_recipe_typos_are_caught(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset_name: x.json\nmax_turn: 2\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["--config", str(recipe)])
    assert "unknown recipe key `max_turn` (did you mean `max_turns`?)" in capsys.readouterr().err
