"""The label audit: what training supervises, through TRL's own labels, and what a run serves and exports."""

import dataclasses
import json
import re
import sys

import pytest
from datasets import Dataset
from helpers import run_command
from test_families import FAMILIES, tiny_model_of
from test_template import HANDWRITTEN, lccc_conversations

from sft.audit.certify import check_generation_config, check_gguf_metadata, check_modelfile
from sft.common.config import parse_recipe
from sft.common.errors import UserError
from sft.common.model import load_tokenizer
from sft.common.template import TEMPLATES
from sft.export.gguf import modelfile, ollama_format
from sft.tiny import SAMPLE_DATA
from sft.train.audit import TrlPreparation, audit_samples, marked_sample, trl_labels

QWEN_TRAINING = (TEMPLATES / "qwen2_5_training.jinja").read_text(encoding="utf-8")
REPLY = "{%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}"
USER_TURN = "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
BROKEN = {
    # the reply is supervised but its <|im_end|> is not: the model never learns to stop
    "no_end_of_turn": (
        QWEN_TRAINING.replace(REPLY, "{%- generation %}{{- message.content }}{%- endgeneration %}{{- '<|im_end|>' }}"),
        r"reply 1: the supervised span \d+\.\.\d+ ends on .*not the end-of-turn token '<\|im_end\|>'",
    ),
    # the span runs on through the newline and the next user turn's header
    "swallows_user_header": (
        QWEN_TRAINING.replace(
            REPLY + "\n            {{- '\\n' }}",
            "{%- generation %}{{- message.content + '<|im_end|>' + '\\n' }}{%- endgeneration %}",
        ).replace(
            USER_TURN,
            "{%- if loop.index0 > 1 %}{%- generation %}{{- '<|im_start|>user\\n' }}{%- endgeneration %}"
            "{%- else %}{{- '<|im_start|>user\\n' }}{%- endif %}{{- message.content + '<|im_end|>\\n' }}",
        ),
        r"conversation 1, reply 1: .* ends on .*'user', 'Ċ'\], not the end-of-turn token",
    ),
    # one character more than the official template: a space after "assistant"
    "one_character_off": (
        QWEN_TRAINING.replace("{{- '<|im_start|>assistant' }}", "{{- '<|im_start|>assistant ' }}"),
        r"conversation 0: the training template without its generation markers differs from the official "
        r"template at character \d+",
    ),
}


@pytest.fixture(scope="module")
def conversations():
    return HANDWRITTEN + lccc_conversations(SAMPLE_DATA, 20)


def audit_with(template_path, conversations, family="qwen2_5", max_length=None):
    """The audit of the family's smoke recipe (with another training template, if given) on `conversations`."""
    tiny_model_of(family)
    extra = ["--chat_template_path", str(template_path)] if template_path else []
    recipe = parse_recipe(["--config", FAMILIES[family].recipe, "--output_dir", "unused", *extra])
    tokenizer = load_tokenizer(recipe.model.model_name_or_path, chat_template_path=recipe.training.chat_template_path)
    data = Dataset.from_list([{"messages": m} for m in conversations])
    samples = trl_labels(TrlPreparation(tokenizer, recipe.training, data), tokenizer, recipe.training, data)
    return tokenizer, samples, audit_samples(tokenizer, tokenizer.official_chat_template, samples, max_length)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_families_pass_the_audit(family, conversations):
    tokenizer, samples, report = audit_with(None, conversations, family)
    assert report.samples == len(conversations) and not report.failures
    report.raise_on_failure()


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_training_template_fails_the_audit_with_the_place(broken, conversations, tmp_path):
    template, message = BROKEN[broken]
    assert template != QWEN_TRAINING
    path = tmp_path / "training.jinja"
    path.write_text(template, encoding="utf-8")
    _, _, report = audit_with(path, conversations)
    assert any(re.search(message, failure) for failure in report.failures), report.failures[:3]
    with pytest.raises(UserError, match="label audit failed"):
        report.raise_on_failure()


def test_truncated_samples_are_counted_and_named(conversations):
    _, samples, report = audit_with(None, conversations, max_length=40)
    longer = [s.index for s in samples if len(s.input_ids) > 40]
    assert longer and len(report.truncated) == len(longer)
    assert report.truncated[0].startswith(f"conversation {longer[0]}: ") and "cut" in report.truncated[0]


def test_the_marked_sample_brackets_each_reply_and_its_end_of_turn(conversations):
    tokenizer, samples, _ = audit_with(None, conversations[1:2])
    plain = marked_sample(tokenizer, samples[0], colour=False)
    assert "[[去 爬 山 了 ， 累 死 了<|im_end|>]]" in plain and plain.count("[[") == 2
    assert "\033[1;32m" in marked_sample(tokenizer, samples[0], colour=True)


def test_a_modelfile_that_stops_on_another_token_fails(conversations):
    tokenizer, _, _ = audit_with(None, conversations[:1])
    official = tokenizer.official_chat_template
    fmt = ollama_format(official)
    assert check_modelfile(modelfile("m.gguf", fmt, None, {}), official, tokenizer) == []
    other = dataclasses.replace(fmt, stops=("<|endoftext|>", "<|im_start|>"))
    [problem] = check_modelfile(modelfile("m.gguf", other, None, {}), official, tokenizer)
    assert "lack the trained end-of-turn token '<|im_end|>'" in problem


def test_a_gguf_with_another_template_or_end_token_fails(conversations):
    tokenizer, _, _ = audit_with(None, conversations[:3])
    official = tokenizer.official_chat_template
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    metadata = {
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.chat_template": official,
    }
    assert check_gguf_metadata(metadata, official, tokenizer, conversations[:3]) == []
    # as llama.cpp converts GLM-4: <|endoftext|> the end token, the trained end-of-turn token the `eot` one
    eot_only = {**metadata, "tokenizer.ggml.eos_token_id": tokenizer.pad_token_id}
    assert check_gguf_metadata(eot_only, official, tokenizer, conversations[:3]) != []
    eot_only["tokenizer.ggml.eot_token_id"] = tokenizer.eos_token_id
    assert check_gguf_metadata(eot_only, official, tokenizer, conversations[:3]) == []
    metadata["tokenizer.chat_template"] = official.replace("You are Qwen", "You are  Qwen")
    metadata["tokenizer.ggml.eos_token_id"] = tokenizer.pad_token_id
    problems = check_gguf_metadata(metadata, official, tokenizer, conversations[:3])
    assert len(problems) == 2 and "'<|endoftext|>', not the trained '<|im_end|>'" in problems[0]


def test_generation_config_must_stop_on_the_trained_token(tmp_path, conversations):
    tokenizer, _, _ = audit_with(None, conversations[:1])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id]}))
    assert check_generation_config(tmp_path, tokenizer) == []
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.pad_token_id}))
    assert "lack the trained end-of-turn token" in check_generation_config(tmp_path, tokenizer)[0]


@pytest.mark.slow
def test_the_audit_command_certifies_a_run_and_fails_a_broken_template(smoke_run, tmp_path):
    passed = run_command(
        [sys.executable, "-m", "sft", "audit", "--model_path", str(smoke_run), "--audit_samples", "40"]
    )
    assert passed.returncode == 0, passed.stderr[-2000:]
    assert "audit passed: 40 samples" in passed.stdout and passed.stdout.count("supervised spans marked") == 2
    assert "[[" in passed.stdout  # not a terminal: brackets
    path = tmp_path / "broken.jinja"
    path.write_text(BROKEN["no_end_of_turn"][0], encoding="utf-8")
    recipe = ["--config", FAMILIES["qwen2_5"].recipe, "--chat_template_path", str(path), "--audit_samples", "20"]
    failed = run_command([sys.executable, "-m", "sft", "audit", *recipe])
    assert failed.returncode == 2
    assert "error: label audit failed" in failed.stderr and "conversation 0, reply 1" in failed.stderr
    assert "Traceback" not in failed.stderr


@pytest.mark.slow
def test_training_stops_on_a_failed_audit_before_its_first_step(tmp_path):
    path = tmp_path / "broken.jinja"
    path.write_text(BROKEN["swallows_user_header"][0], encoding="utf-8")
    output_dir = tmp_path / "out"
    args = ["--config", FAMILIES["qwen2_5"].recipe, "--chat_template_path", str(path), "--output_dir", str(output_dir)]
    failed = run_command([sys.executable, "-m", "sft", "train", *args])
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "error: label audit failed" in failed.stderr and "conversation 1, reply 1" in failed.stderr
    assert "Traceback" not in failed.stderr and "'loss'" not in failed.stdout + failed.stderr
    assert not list(output_dir.glob("checkpoint-*")) and not (output_dir / "run_summary.json").exists()


def test_qwen3_prompts_are_served_in_the_non_thinking_mode_it_was_trained_in():
    from sft.common.inference import render_prompt

    tokenizer, samples, _ = audit_with(None, HANDWRITTEN[:1], "qwen3")
    prompt = render_prompt(tokenizer, HANDWRITTEN[0][:1])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    trained = tokenizer.decode(samples[0].input_ids)
    assert trained.startswith(prompt)  # the trained text continues the served prompt with the reply
