"""`sft.evaluate`: the LCCC paper's metrics worked out by hand, reply-only perplexity, and end-to-end reports."""

import json
import math

import pytest
import sacrebleu
import torch
from helpers import run_command

from sft.evaluate import average_length, bleu, distinct, generate_replies, main, reply_metrics, reply_perplexity
from sft.generation import GenerationArguments
from sft.inference import encode_prompt, render_prompt

# --- Metrics against values worked out by hand. ------------------------------------------------------------------


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
    assert bleu([], [], 4) == 0.0


def test_bleu_equals_sacrebleu_on_a_small_chinese_corpus():
    # sacrebleu's `zh` tokenizer splits Chinese text into characters, so on Chinese-only text it must agree.
    replies = ["哈哈，我也觉得。", "明天见！", "不会再煎糊了吧？", "你教了多久？", "真的假的"]
    references = ["是啊，我也这么觉得。", "好的，明天见。", "下次别煎糊了。", "教了多久啊？", "真的吗？"]
    for order in (2, 4):
        expected = sacrebleu.metrics.BLEU(tokenize="zh", max_ngram_order=order).corpus_score(replies, [references])
        assert bleu(replies, references, order) == pytest.approx(expected.score)


def test_distinct_and_length_by_hand():
    replies = ["哈哈哈", "哈哈 好"]
    # characters 哈哈哈 + 哈哈好: 6 unigrams, 2 distinct (哈, 好); bigrams 哈哈 哈哈 + 哈哈 哈好: 4, 2 distinct.
    assert distinct(replies, 1) == pytest.approx(2 / 6)
    assert distinct(replies, 2) == pytest.approx(2 / 4)
    assert average_length(replies) == 3
    assert distinct(["好"], 2) == 0.0 and distinct([], 1) == 0.0 and average_length([]) == 0.0
    metrics = reply_metrics(replies, ["哈哈哈", "好"])
    assert set(metrics) == {"bleu_2", "bleu_4", "distinct_1", "distinct_2", "avg_len"}


# --- Perplexity and generation on the smoke run's model. ---------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好呀"}],
    [
        {"role": "user", "content": "吃了吗？"},
        {"role": "assistant", "content": "吃了，你呢？"},
        {"role": "user", "content": "还没有。"},
        {"role": "assistant", "content": "快去吃吧。"},
    ],
    [{"role": "system", "content": "你是一个友好的助手。"}, {"role": "user", "content": "在吗"}],
]


class Uniform(torch.nn.Module):
    """A model that gives every token the same logit: its perplexity is the vocabulary size."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return type("Output", (), {"logits": torch.zeros(*input_ids.shape, self.vocab_size)})


def reply_token_count(trained_tokenizer, messages, last_only=False) -> int:
    """Tokens of each reply: the conversation up to and with it, minus the prompt that asks for it."""
    count = 0
    for end, message in enumerate(messages):
        if message["role"] == "assistant" and (end == len(messages) - 1 or not last_only):
            with_reply = trained_tokenizer.apply_chat_template(messages[: end + 1], return_dict=True)["input_ids"]
            prompt = encode_prompt(trained_tokenizer, render_prompt(trained_tokenizer, messages[:end]))["input_ids"]
            assert with_reply[: len(prompt)] == prompt
            count += len(with_reply) - len(prompt)
    return count


def test_perplexity_counts_the_reply_tokens_only(trained_tokenizer):
    conversations = CONVERSATIONS[:2]
    result = reply_perplexity(
        Uniform(len(trained_tokenizer)), trained_tokenizer, conversations, max_length=256, batch_size=2
    )
    assert result["perplexity"] == pytest.approx(len(trained_tokenizer))
    assert result["reply_tokens"] == sum(reply_token_count(trained_tokenizer, m) for m in conversations)
    last_only = reply_perplexity(
        Uniform(len(trained_tokenizer)), trained_tokenizer, conversations, 256, 2, last_reply_only=True
    )
    assert last_only["reply_tokens"] == sum(
        reply_token_count(trained_tokenizer, m, last_only=True) for m in conversations
    )
    assert last_only["reply_tokens"] < result["reply_tokens"]


def test_perplexity_does_not_depend_on_batching(trained_model, trained_tokenizer):
    conversations = CONVERSATIONS[:2]
    one_by_one = reply_perplexity(trained_model, trained_tokenizer, conversations, max_length=256, batch_size=1)
    together = reply_perplexity(trained_model, trained_tokenizer, conversations, max_length=256, batch_size=2)
    assert together["reply_tokens"] == one_by_one["reply_tokens"]
    assert together["perplexity"] == pytest.approx(one_by_one["perplexity"], rel=1e-4)


def test_batched_left_padded_generation_matches_one_by_one_and_is_seeded(trained_model, trained_tokenizer):
    contexts = [CONVERSATIONS[0][:1], CONVERSATIONS[1][:3], CONVERSATIONS[2]]
    settings = GenerationArguments(max_new_tokens=6, top_p=0.9, temperature=0.7, seed=7)
    batched = generate_replies(trained_model, trained_tokenizer, contexts, settings, 3, sample=False)
    single = [generate_replies(trained_model, trained_tokenizer, [c], settings, 1, sample=False)[0] for c in contexts]
    assert batched == single
    sampled = generate_replies(trained_model, trained_tokenizer, contexts, settings, 3, sample=True)
    assert generate_replies(trained_model, trained_tokenizer, contexts, settings, 3, sample=True) == sampled


# --- End to end on the smoke run. ----------------------------------------------------------------------------------

SMALL = ["--num_samples", "3", "--max_ppl_samples", "8", "--max_new_tokens", "6"]
METRICS = ("perplexity", "bleu_2", "bleu_4", "distinct_1", "distinct_2", "avg_len")


def test_eval_of_the_smoke_adapter_writes_the_reports(smoke_run, tmp_path, capsys):
    report = main(["--model_path", str(smoke_run), "--output_dir", str(tmp_path), *SMALL])
    saved = json.loads((tmp_path / "eval_report.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(report, ensure_ascii=False))
    for key in METRICS:
        assert math.isfinite(saved[key]) and saved[key] >= 0, key
    assert saved["perplexity"] > 1 and "base" not in saved
    assert saved["greedy"].keys() == saved["sampling"].keys() == set(METRICS) - {"perplexity"}
    settings = saved["settings"]
    assert settings["split"] == "test" and settings["ppl_conversations"] == 8 and settings["num_samples"] == 3
    assert settings["quantization"].startswith("4-bit nf4") and (settings["top_p"], settings["temperature"]) == (
        0.9,
        0.7,
    )
    assert len(saved["samples"]) == 3
    assert {"context", "reference", "greedy", "sampled"} <= saved["samples"][0].keys()
    assert saved["samples"][0]["context"][-1]["role"] == "user"
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "eval_report.md").read_text(encoding="utf-8")
    assert "| metric | value |" in markdown and "loss_curves.png" in markdown and "## Examples" in markdown
    printed = capsys.readouterr().out
    assert "| perplexity (replies) |" in printed and "| BLEU-4, sampling |" in printed


def test_eval_compare_base_as_the_original_project_ran_it(smoke_run, tmp_path):
    # The original project's form: the script as a file (where `import evaluate` must still mean the HF package).
    result = run_command(
        ["python", "sft/evaluate.py", "--model_path", str(smoke_run), "--output_dir", str(tmp_path), "--compare_base"]
        + SMALL
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval_report.json").read_text(encoding="utf-8"))
    base = report["base"]
    for key in METRICS:
        assert math.isfinite(base[key]), key
    assert base["reply_tokens"] == report["reply_tokens"]
    # The smoke run learned (its eval loss falls): the adapter must beat the random base on held-out replies.
    assert report["perplexity"] < base["perplexity"]
    assert {"base_greedy", "base_sampled"} <= report["samples"][0].keys()
    assert "| metric | fine-tuned | base |" in result.stdout
    assert "## Examples" in (tmp_path / "eval_report.md").read_text(encoding="utf-8")


def test_eval_of_a_missing_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_path", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: model path not found")
    with pytest.raises(SystemExit):
        main(["--model_path", str(tmp_path)])
    assert "neither a LoRA adapter" in capsys.readouterr().err
