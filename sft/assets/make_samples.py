"""Writes the small alpaca- and ShareGPT-format samples beside the LCCC sample, for the mixed smoke recipe.

    python sft/assets/make_samples.py

Simple Chinese instructions and conversations made from templates (arithmetic, antonyms, counting, greetings),
so the project ships data of every format it reads without borrowing anyone's.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIGITS = "零一两三四五六七八九十"  # counting things: 两个, not 二个
ANTONYMS = [("大", "小"), ("高", "低"), ("快", "慢"), ("冷", "热"), ("多", "少"), ("长", "短"), ("新", "旧")]
FRUITS = ["苹果", "香蕉", "橘子", "葡萄", "西瓜", "梨"]
GREETINGS = ["你好", "早上好", "晚上好", "在吗", "嗨"]


def alpaca_record(rng: random.Random, number: int) -> dict:
    kind = number % 4
    if kind == 0:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        record = {"instruction": "计算下面的算式。", "input": f"{a} + {b}", "output": f"{a} + {b} = {a + b}。"}
    elif kind == 1:
        word, opposite = rng.choice(ANTONYMS)
        record = {"instruction": f"写出“{word}”的反义词。", "input": "", "output": f"“{word}”的反义词是“{opposite}”。"}
    elif kind == 2:
        count, fruit = rng.randint(2, 9), rng.choice(FRUITS)
        record = {
            "instruction": "用一句话描述这些水果有多少个。",
            "input": "、".join([fruit] * count),
            "output": f"一共有{DIGITS[count]}个{fruit}。",
        }
    else:
        a = rng.randint(2, 99)
        record = {
            "instruction": f"{a} 的两倍是多少？",
            "output": f"{a} 的两倍是 {2 * a}。",
            "history": [["我们来做几道数学题。", "好的，请出题。"]],
            "system": "你是一位耐心的数学老师。",
        }
    return record


def sharegpt_record(rng: random.Random, number: int) -> dict:
    fruit = rng.choice(FRUITS)
    turns = [
        ("human", f"{rng.choice(GREETINGS)}，我想买点水果。"),
        ("gpt", f"好的，今天的{fruit}很新鲜，要来点吗？"),
        ("human", f"{fruit}多少钱一斤？"),
        ("gpt", f"{fruit}{rng.randint(3, 30)}块钱一斤。"),
    ]
    conversation = [{"from": speaker, "value": text} for speaker, text in turns[: 2 + 2 * (number % 2)]]
    if number % 5 == 0:
        conversation.insert(0, {"from": "system", "value": "你是水果店的店员，回答要简短。"})
    return {"conversations": conversation}


def main() -> None:
    rng = random.Random(0)
    alpaca = [alpaca_record(rng, number) for number in range(120)]
    (HERE / "alpaca_sample.json").write_text(json.dumps(alpaca, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    lines = [json.dumps(sharegpt_record(rng, number), ensure_ascii=False) for number in range(120)]
    (HERE / "sharegpt_sample.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
