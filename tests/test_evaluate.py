"""`lccc-sft eval`: reply-only perplexity, batched generation, generation settings saved with a run, reports."""

import json
import math
import shutil

import pytest
import torch
from helpers import run_command

from sft.common.generation import (
    GENERATION_CONFIG,
    GenerationArguments,
    load_generation_defaults,
    save_generation_config,
)
from sft.common.inference import encode_prompt, read_run, render_prompt
from sft.evaluation.batch_generation import cut_at_end_of_turn, generate_replies
from sft.evaluation.diagnostics import DIAGNOSTICS
from sft.evaluation.evaluate import main
from sft.evaluation.held_out import reply_perplexity

pytestmark = pytest.mark.slow  # every test here needs a training run, a server or a browser

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


def test_reply_perplexity_matches_the_models_own_loss_on_the_replies(trained_model, trained_tokenizer):
    """Independently of our scoring: the model's own (internally shifted) loss with every label but the reply
    tokens masked, one conversation at a time, weighted by its reply tokens. Scoring one position off fails this
    (a uniform model cannot tell, a trained one can)."""
    conversations = CONVERSATIONS[:2]  # both with replies (the third has none)
    result = reply_perplexity(trained_model, trained_tokenizer, conversations, max_length=256, batch_size=2)
    total_nll, count = 0.0, 0
    for messages in conversations:
        encoded = trained_tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        ids = torch.tensor([encoded["input_ids"]])
        labels = torch.where(torch.tensor([encoded["assistant_masks"]]).bool(), ids, -100)
        replies = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total_nll += trained_model(input_ids=ids, labels=labels).loss.item() * replies
        count += replies
    assert result["reply_tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total_nll / count), rel=1e-4)


def test_perplexity_does_not_depend_on_batching(trained_model, trained_tokenizer):
    conversations = CONVERSATIONS[:2]
    one_by_one = reply_perplexity(trained_model, trained_tokenizer, conversations, max_length=256, batch_size=1)
    together = reply_perplexity(trained_model, trained_tokenizer, conversations, max_length=256, batch_size=2)
    assert together["reply_tokens"] == one_by_one["reply_tokens"]
    assert together["perplexity"] == pytest.approx(one_by_one["perplexity"], rel=1e-4)


def test_batched_generation_by_length_matches_one_by_one_and_is_seeded(trained_model, trained_tokenizer):
    # Prompts of different lengths, not in length order: replies must come back in the order of the contexts.
    contexts = [CONVERSATIONS[0][:1], CONVERSATIONS[1][:3], CONVERSATIONS[2]]
    settings = GenerationArguments(max_new_tokens=6, top_p=0.9, temperature=0.7, seed=7)
    batched = generate_replies(trained_model, trained_tokenizer, contexts, settings, 2, sample=False).replies
    single = [
        generate_replies(trained_model, trained_tokenizer, [c], settings, 1, sample=False).replies[0] for c in contexts
    ]
    assert batched == single
    for reply in batched:
        assert 1 <= reply.tokens <= 6 and (reply.stopped or reply.tokens == 6)
    sampled = generate_replies(trained_model, trained_tokenizer, contexts, settings, 3, sample=True)
    assert (
        generate_replies(trained_model, trained_tokenizer, contexts, settings, 3, sample=True).replies
        == sampled.replies
    )
    assert sampled.speed["generated_tokens"] == sum(reply.tokens for reply in sampled.replies)
    assert sampled.speed["replies_per_s"] == pytest.approx(3 / sampled.seconds)


def test_a_reply_ends_at_its_own_end_of_turn_token():
    assert cut_at_end_of_turn([5, 6, 2, 2, 2], end_of_turn=2) == ([5, 6, 2], True)  # then padding (pad = eos)
    assert cut_at_end_of_turn([5, 6, 7], end_of_turn=2) == ([5, 6, 7], False)  # ran into max_new_tokens


# --- Generation settings saved with a run. -------------------------------------------------------------------------


def test_generation_settings_round_trip_through_generation_config_json(trained_tokenizer, tmp_path):
    assert load_generation_defaults(tmp_path) == GenerationArguments()  # no file: the defaults
    chosen = GenerationArguments(max_new_tokens=40, do_sample=False, top_k=20, repetition_penalty=1.2)
    chosen.no_repeat_ngram_size = 3
    save_generation_config(tmp_path, chosen, trained_tokenizer)
    saved = json.loads((tmp_path / GENERATION_CONFIG).read_text(encoding="utf-8"))
    assert saved["eos_token_id"] == trained_tokenizer.eos_token_id and saved["repetition_penalty"] == 1.2
    assert load_generation_defaults(tmp_path) == chosen
    assert load_generation_defaults(tmp_path, {"top_k": 5, "seed": 3}) == GenerationArguments(
        max_new_tokens=40, do_sample=False, top_k=5, repetition_penalty=1.2, no_repeat_ngram_size=3, seed=3
    )


def test_a_broken_generation_config_is_one_line(tmp_path, capsys):
    (tmp_path / GENERATION_CONFIG).write_text("{not json", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_path", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / GENERATION_CONFIG} is not a readable")


# --- End to end on the smoke run. ----------------------------------------------------------------------------------

SMALL = ["--num_samples", "3", "--max_ppl_samples", "8", "--max_new_tokens", "6"]
METRICS = ("perplexity", "bleu_2", "bleu_4", "distinct_1", "distinct_2", "avg_len")


REPLY_METRICS = ("bleu_2", "bleu_4", "distinct_1", "distinct_2", "avg_len")
STOP_AND_LOOP = ("no_stop_rate", "loop_rate", "repeated_ngram_rate", "replies_per_s", "tokens_per_s")


def copy_of_run(smoke_run, tmp_path):
    """The smoke run's output folder without its checkpoints, to change its files safely."""
    return shutil.copytree(smoke_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint-*"))


def test_training_saves_the_default_generation_settings_with_the_run(smoke_run):
    assert load_generation_defaults(smoke_run) == GenerationArguments()
    saved = json.loads((smoke_run / GENERATION_CONFIG).read_text(encoding="utf-8"))
    assert saved["eos_token_id"] == 2 and saved["top_p"] == 0.9 and saved["repetition_penalty"] == 1.0


def test_eval_of_the_smoke_adapter_writes_the_reports(smoke_run, tmp_path, capsys):
    run = copy_of_run(smoke_run, tmp_path)
    with open(run / "recipe.yaml", "a", encoding="utf-8") as recipe:  # a system prompt: the probes run too
        recipe.write("\nsystem_prompt: 你是一个简短回答的中文助手。\n")
    saved_settings = GenerationArguments(max_new_tokens=5, repetition_penalty=1.3, no_repeat_ngram_size=2, top_k=40)
    save_generation_config(run, saved_settings, read_run(str(run)).load_tokenizer())
    out = tmp_path / "report"
    args = ["--model_path", str(run), "--output_dir", str(out), *SMALL, "--save_generation_config", "true"]
    report = main(args)
    saved = json.loads((out / "eval_report.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(report, ensure_ascii=False))
    for key in METRICS:
        assert math.isfinite(saved[key]) and saved[key] >= 0, key
    assert saved["perplexity"] > 1 and "base" not in saved and "knowledge" not in saved
    assert saved["greedy"].keys() == saved["sampling"].keys() >= {*REPLY_METRICS, *STOP_AND_LOOP}
    for decoding in ("greedy", "sampling"):
        scores = saved[decoding]
        assert 0 <= scores["no_stop_rate"] <= 1 and 0 <= scores["loop_rate"] <= 1
        assert scores["replies_per_s"] > 0 and scores["tokens_per_s"] >= scores["replies_per_s"]
        unstopped = [w for w in saved["worst"] if w["decoding"] == decoding and not w["stopped"]]
        assert len(unstopped) == round(scores["no_stop_rate"] * 3)
        assert all(w["tokens"] == 6 for w in unstopped)
    settings = saved["settings"]
    assert settings["split"] == "test" and settings["ppl_conversations"] == 8 and settings["num_samples"] == 3
    assert settings["quantization"].startswith("4-bit nf4")
    # The run's saved settings are the defaults; the command line (--max_new_tokens 6) wins over them.
    assert (settings["top_p"], settings["temperature"], settings["max_new_tokens"]) == (0.9, 0.7, 6)
    assert (settings["repetition_penalty"], settings["no_repeat_ngram_size"], settings["top_k"]) == (1.3, 2, 40)
    # --save_generation_config: what was evaluated is what chat and the server start from.
    assert load_generation_defaults(run) == GenerationArguments(
        max_new_tokens=6, repetition_penalty=1.3, no_repeat_ngram_size=2, top_k=40
    )
    assert len(saved["samples"]) == 3
    assert {"context", "reference", "greedy", "sampled"} <= saved["samples"][0].keys()
    assert saved["samples"][0]["context"][-1]["role"] == "user"
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "eval_report.md").read_text(encoding="utf-8")
    assert "| metric | value |" in markdown and "loss_curves.png" in markdown and "## Examples" in markdown
    assert "## Worst replies" in markdown and "| never stopped (share), greedy |" in markdown
    # The Chinese chat diagnostics: the shipped sample's training replies seen more than once are the generic ones.
    assert saved["diagnostics"]["generic_replies"] == [["几点？", 3], ["去哪儿？", 2]]
    assert saved["diagnostics"]["system_prompt"] == "你是一个简短回答的中文助手。"
    assert saved["diagnostics"]["dialogues"] > 0
    for key in DIAGNOSTICS:
        assert 0 <= saved[key] <= 1, key
    assert "## Chinese chat diagnostics" in markdown and "几点？ (3)" in markdown
    assert "| system-prompt probes kept (share), sampling |" in markdown
    printed = capsys.readouterr().out
    assert "| perplexity (replies) |" in printed and "| BLEU-4, sampling |" in printed
    assert "| loops (share), sampling |" in printed and "| replies/s, greedy |" in printed


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
    # The untrained base never says its end-of-turn token: every reply runs into max_new_tokens and is listed.
    assert base["greedy"]["no_stop_rate"] == base["sampling"]["no_stop_rate"] == 1.0
    assert len([w for w in report["worst"] if w["model"] == "base" and not w["stopped"]]) == 6
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
