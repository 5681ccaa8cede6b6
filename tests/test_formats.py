"""alpaca and ShareGPT records: their conversion to chat messages, from every file kind and the Hub, bad records."""

import gzip
import json
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from sft.common.config import DataArguments
from sft.common.errors import UserError
from sft.data import load_prepared, prepared_folder, sources
from sft.data.formats import alpaca_messages, sharegpt_messages
from sft.data.records import MalformedRecord


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def prepare(tmp_path, name, **options) -> tuple[list[list[dict]], dict]:
    """Every prepared sample's messages (all splits, sorted) and stats.json."""
    args = DataArguments(dataset_name=str(name), processed_dir=str(tmp_path / "processed"), **options)
    folder = prepared_folder(args, 42)
    samples = sorted((row["messages"] for ds in load_prepared(folder).values() for row in ds), key=json.dumps)
    return samples, json.loads((folder / "stats.json").read_text(encoding="utf-8"))


def write(path, records: list, kind: str):
    """Records as a JSON list, JSONL (gzip-compressed for .gz) or parquet."""
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif kind == "json":
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    else:
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        with gzip.open(path, "wt", encoding="utf-8") if path.suffix == ".gz" else path.open("w") as out:
            out.write(text)
    return path


# --- alpaca --------------------------------------------------------------------------------------------------


def test_alpaca_instruction_and_input_are_the_user_message_with_system_and_history():
    record = {
        "instruction": "翻译成英文。",
        "input": "你好",
        "output": "Hello",
        "system": "你是翻译。",
        "history": [["你会翻译吗？", "会。"], ["", "空的一轮被丢掉"]],
    }
    assert alpaca_messages(record) == [
        {"role": "system", "content": "你是翻译。"},
        user("你会翻译吗？"),
        assistant("会。"),
        user("翻译成英文。\n\n你好"),
        assistant("Hello"),
    ]
    plain = {"instruction": "说你好", "input": "", "output": "你好"}
    assert alpaca_messages(plain) == [user("说你好"), assistant("你好")]


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"instruction": "问", "output": 3}, "`output` is not text"),
        ({"instruction": None, "output": "答"}, "`instruction` is missing"),
        ({"instruction": "问", "output": "答", "history": [["只有一半"]]}, "`history` must be a list of"),
        (["问", "答"], "an alpaca record must be an object"),
    ],
)
def test_malformed_alpaca_records_say_why(record, problem):
    with pytest.raises(MalformedRecord, match=problem):
        alpaca_messages(record)


ALPACA = [{"instruction": f"第{i}题：{i}加{i}等于几？", "input": "", "output": f"等于{2 * i}。"} for i in range(60)]


@pytest.mark.parametrize(("file_name", "kind"), [("a.json", "json"), ("a.jsonl.gz", "jsonl"), ("a.parquet", "parquet")])
def test_alpaca_from_every_file_kind(tmp_path, file_name, kind):
    records = [*ALPACA, {"instruction": "没有回答", "output": ""}]
    samples, stats = prepare(tmp_path, write(tmp_path / file_name, records, kind))
    assert samples == sorted(([user(r["instruction"]), assistant(r["output"])] for r in ALPACA), key=json.dumps)
    assert stats["data_format"] == "alpaca" and stats["dropped_dialogues"]["too_short"] == 1


def test_bad_alpaca_lines_are_counted_and_reported(tmp_path):
    records = [*ALPACA, {"instruction": "问"}]
    samples, stats = prepare(tmp_path, write(tmp_path / "a.jsonl", records, "jsonl"), max_malformed_share=0.05)
    assert len(samples) == len(ALPACA) and stats["dropped_dialogues"]["malformed"] == 1
    assert stats["malformed_examples"] == ["line 61: `output` is missing"]


def test_alpaca_rows_of_a_hub_dataset_are_read_whole(tmp_path):
    loaded = DatasetDict({"train": Dataset.from_list([{**r, "source": "x"} for r in ALPACA])})
    with mock.patch.object(sources, "load_dataset", return_value=loaded):
        samples, stats = prepare(tmp_path, "someone/alpaca-zh")
    assert len(samples) == len(ALPACA) and [user("第7题：7加7等于几？"), assistant("等于14。")] in samples


# --- ShareGPT ------------------------------------------------------------------------------------------------


def test_sharegpt_roles_are_mapped_and_empty_turns_dropped():
    conversation = [
        {"from": "system", "value": "简短回答。"},
        {"from": "human", "value": "你好"},
        {"from": "gpt", "value": "你好！"},
        {"from": "user", "value": "  "},
        {"from": "model", "value": "这一轮的问题是空的"},
        {"from": "human", "value": "再见"},
        {"from": "assistant", "value": "再见！"},
        {"from": "human", "value": "没有回答的最后一句"},
    ]
    assert sharegpt_messages({"conversations": conversation}, None) == [
        {"role": "system", "content": "简短回答。"},
        user("你好"),
        assistant("你好！"),
        user("再见"),
        assistant("再见！"),
    ]
    role_content = [{"role": "user", "content": "在吗"}, {"role": "assistant", "content": "在"}]
    assert sharegpt_messages({"messages": role_content}, None) == [user("在吗"), assistant("在")]


@pytest.mark.parametrize(
    ("conversation", "problem"),
    [
        ([{"from": "gpt", "value": "先说话"}, {"from": "human", "value": "问"}], "message 1 is from the assistant"),
        ([{"from": "human", "value": "问"}, {"from": "human", "value": "又问"}], "not alternating"),
        ([{"from": "human", "value": "问"}, {"from": "system", "value": "晚了"}], "message 2 is from the system"),
        ([{"from": "bot", "value": "你好"}], "unknown role 'bot'"),
        ([{"from": "human", "value": 5}], "message 1 holds no text"),
        ("你好", "a conversation must be a list"),
    ],
)
def test_a_sharegpt_conversation_that_does_not_alternate_is_malformed(conversation, problem):
    with pytest.raises(MalformedRecord, match=problem):
        sharegpt_messages({"conversations": conversation}, None)


SHAREGPT = [
    {"conversations": [{"from": "human", "value": f"第{i}个问题"}, {"from": "gpt", "value": f"第{i}个回答"}]}
    for i in range(60)
]


@pytest.mark.parametrize(("file_name", "kind"), [("s.json", "json"), ("s.jsonl", "jsonl"), ("s.parquet", "parquet")])
def test_sharegpt_from_every_file_kind_with_bad_records_counted(tmp_path, file_name, kind):
    swapped = {"conversations": [{"from": "gpt", "value": "答"}, {"from": "human", "value": "问"}]}
    path = write(tmp_path / file_name, [*SHAREGPT, swapped], kind)
    samples, stats = prepare(tmp_path, path, max_malformed_share=0.05)
    assert len(samples) == len(SHAREGPT) and [user("第3个问题"), assistant("第3个回答")] in samples
    assert stats["data_format"] == "sharegpt" and stats["dropped_dialogues"]["malformed"] == 1
    assert "message 1 is from the assistant where the user speaks" in stats["malformed_examples"][0]


def test_sharegpt_column_of_a_hub_dataset(tmp_path):
    loaded = DatasetDict({"train": Dataset.from_list([{**r, "id": i} for i, r in enumerate(SHAREGPT)])})
    with mock.patch.object(sources, "load_dataset", return_value=loaded):
        samples, stats = prepare(tmp_path, "someone/sharegpt-zh")
    assert stats["data_format"] == "sharegpt" and [user("第5个问题"), assistant("第5个回答")] in samples


def test_the_format_key_forces_a_format(tmp_path):
    chat = [{"messages": [{"role": "assistant", "content": f"先说{i}"}, user(f"后问{i}")]} for i in range(40)]
    path = write(tmp_path / "c.jsonl", chat, "jsonl")
    samples, stats = prepare(tmp_path, path)  # chat form passes through untouched
    assert stats["data_format"] == "messages" and len(samples) == 40
    with pytest.raises(UserError, match="40 of 40 records in .* are malformed"):
        prepare(tmp_path, path, data_format="sharegpt")  # as ShareGPT, none of them alternates from the user
