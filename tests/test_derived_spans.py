"""Any chat model: for a template with no training form of ours or TRL's, a training template with generation
markers is derived from it and proven (its text is the official text, its spans those derived by rendering growing
prefixes of each conversation); where it cannot be captured so (GLM-4, a system prompt folded into the first user
turn) the spans are derived per conversation; a template that rewrites earlier turns is refused."""

import json
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
from datasets import Dataset, DatasetDict
from helpers import run_command
from test_families import FAMILIES, tiny_model_of
from test_template import HANDWRITTEN, lccc_conversations
from transformers import AutoTokenizer
from trl.chat_template_utils import deepseek_r1_distill_chat_template, qwen3_chat_template

from sft.common.config import parse_recipe
from sft.common.errors import UserError
from sft.common.model import load_tokenizer
from sft.common.template import (
    derived_reply_mask,
    is_derived_training_template,
    template_difference,
    training_template_kind,
)
from sft.tiny import GLM4_CHAT_TEMPLATE, SAMPLE_DATA
from sft.train.audit import TrlPreparation, audit_before_training, audit_samples, trl_labels
from sft.train.trainer import build_trainer, with_derived_reply_spans

# Zephyr's chat template (HuggingFaceH4/zephyr-7b-beta): neither TRL nor we have a training form of it.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
# The same text with generation markers around each reply and its </s>, written by hand: the independent count.
ZEPHYR_MARKED = ZEPHYR.replace(
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n",
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}\n\n",
)
# A local ChatML template (the form Qwen, Yi and many fine-tunes use), not TRL's copy of any model's.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-7B-Instruct-v0.1's: BOS once, [INST] turns, no system prompt (it raises).
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# A system prompt folded into the first user turn (as Llama-2's): no piece of text per role to write a template from.
FOLDED = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\n\n' %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{{ 'USER: ' + (system if loop.first else '') + m['content']"
    " + '\n' }}{%- else %}{{ 'BOT: ' + m['content'] + eos_token + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'BOT: ' }}{%- endif %}"
)
# A local variant of Gemma's (google/gemma-2-2b-it; TRL has a training form of the original): contents trimmed, the
# assistant called `model`, no system prompt, replies ending with <end_of_turn> (set as the tokenizer's eos_token).
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}{#- a local variant #}"
)
CUSTOM = {
    "zephyr": ("llama", ZEPHYR, None),
    "chatml": ("qwen2_5", CHATML, None),
    "mistral": ("llama", MISTRAL, None),
    "gemma": ("llama", GEMMA, "<end_of_turn>"),
}


def model_with_template(folder, family: str, template: str, eos_token: str | None = None):
    """A copy of the family's tiny model whose tokenizer ships `template` as its official chat template (and a new
    `eos_token`, if given: then for its tokenizer only, the model has no embedding for it)."""
    shutil.copytree(tiny_model_of(family), folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    if eos_token:
        tokenizer.add_special_tokens({"eos_token": eos_token})
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def conversations():
    return HANDWRITTEN + lccc_conversations(SAMPLE_DATA, 20)


@pytest.fixture(scope="module")
def zephyr_model(tmp_path_factory):
    """The tiny Llama with Zephyr's chat template instead of Llama-2's."""
    return model_with_template(tmp_path_factory.mktemp("tiny-zephyr"), "llama", ZEPHYR)


def hand_marked_masks(tokenizer, messages):
    return tokenizer.apply_chat_template(
        messages, chat_template=ZEPHYR_MARKED, return_dict=True, return_assistant_tokens_mask=True
    )


def test_the_derived_spans_are_the_hand_marked_replies_and_their_end_of_turn(zephyr_model, conversations):
    tokenizer = load_tokenizer(str(zephyr_model))
    assert tokenizer.official_chat_template == ZEPHYR
    for messages in conversations:
        derived = derived_reply_mask(tokenizer, messages, chat_template=ZEPHYR)
        expected = hand_marked_masks(tokenizer, messages)
        assert derived["input_ids"] == list(expected["input_ids"])
        assert derived["assistant_masks"] == list(expected["assistant_masks"])


@pytest.mark.parametrize("name", sorted(CUSTOM))
def test_a_training_template_is_derived_and_renders_the_official_text_with_the_derived_spans(
    name, conversations, tmp_path
):
    family, official, eos_token = CUSTOM[name]
    tokenizer = load_tokenizer(str(model_with_template(tmp_path, family, official, eos_token)))
    assert tokenizer.official_chat_template == official and training_template_kind(tokenizer.chat_template) == "derived"
    if name in ("mistral", "gemma"):  # no system prompt: the derived template refuses one, as the official one does
        with pytest.raises(Exception, match="takes no system message"):
            tokenizer.apply_chat_template(HANDWRITTEN[2], tokenize=False)
        conversations = [c for c in conversations if c[0]["role"] != "system"]
    for messages in conversations:
        for prompt in (False, True):
            turns = messages[:-1] if prompt else messages
            assert (
                template_difference(tokenizer, tokenizer.chat_template, official, turns, add_generation_prompt=prompt)
                is None
            )
        marked = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        expected = (
            hand_marked_masks(tokenizer, messages)
            if name == "zephyr"
            else derived_reply_mask(tokenizer, messages, chat_template=official)
        )
        assert list(marked["input_ids"]) == list(expected["input_ids"])
        assert list(marked["assistant_masks"]) == list(expected["assistant_masks"])


@pytest.mark.parametrize(
    ("template", "family"), [(GLM4_CHAT_TEMPLATE, "glm4"), (FOLDED, "llama")], ids=["glm4", "system_folded"]
)
def test_a_template_that_cannot_be_written_with_markers_trains_on_spans_derived_per_conversation(
    template, family, conversations, tmp_path
):
    """GLM-4's reply ends at the next `<|user|>` (the last one at none), and a system prompt folded into the first
    user turn has no text of its own: no template with markers renders their text, so each conversation's spans are
    derived, and the run records it."""
    tokenizer = load_tokenizer(str(model_with_template(tmp_path, family, template)))
    assert tokenizer.chat_template == template == tokenizer.official_chat_template
    assert training_template_kind(tokenizer.chat_template) == "official_with_derived_spans"
    derived = derived_reply_mask(tokenizer, conversations[1])  # the one with a system prompt and two replies
    mask = derived["assistant_masks"]
    assert sum(1 for a, b in zip([0, *mask], mask, strict=False) if b > a) == 2  # two spans: the two replies
    data = DatasetDict(train=Dataset.from_list([{"messages": m} for m in conversations[:3]]))
    whole = SimpleNamespace(assistant_only_loss=False)  # loss on every token: nothing to derive
    assert with_derived_reply_spans(whole, tokenizer, data) == (whole, data)
    args, masked = with_derived_reply_spans(SimpleNamespace(assistant_only_loss=True), tokenizer, data)
    assert not args.assistant_only_loss and {"input_ids", "assistant_masks"} <= set(masked["train"].column_names)


@pytest.mark.slow
def test_a_model_without_a_training_template_trains_with_the_derived_one(zephyr_model, conversations, tmp_path):
    """Through TRL's own generation-marker path (`assistant_only_loss` kept), on exactly the hand-marked tokens."""
    args = ["--config", "recipes/smoke.yaml", "--output_dir", str(tmp_path), "--max_length", "1024"]
    recipe = parse_recipe([*args, "--model_name_or_path", str(zephyr_model), "--max_steps", "2"])
    data = Dataset.from_list([{"messages": m} for m in conversations])
    trainer = build_trainer(recipe, DatasetDict(train=data, validation=data.select(range(2))))
    tokenizer = trainer.processing_class
    assert is_derived_training_template(tokenizer.chat_template) and trainer.args.assistant_only_loss
    supervised = sum(sum(label != -100 for label in row["labels"]) for row in trainer.train_dataset)
    expected = sum(sum(hand_marked_masks(tokenizer, m)["assistant_masks"]) for m in conversations)
    assert supervised == expected > 0
    replies = sum(m["role"] == "assistant" for c in conversations for m in c)
    assert sum(row["labels"].count(tokenizer.eos_token_id) for row in trainer.train_dataset) == replies
    report = audit_before_training(trainer, recipe.training, tokenizer.official_chat_template, data)
    assert report.samples == len(conversations) and not report.failures
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.gathered_counts()[0, 2] > 0


@pytest.mark.slow
def test_a_run_writes_its_derived_template_and_the_audit_proves_it_on_the_data(tmp_path):
    model, run = model_with_template(tmp_path / "tiny-chatml", "qwen2_5", CHATML), tmp_path / "run"
    recipe = ["--config", FAMILIES["qwen2_5"].recipe, "--model_name_or_path", str(model), "--output_dir", str(run)]
    quick = ["--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no"]
    trained = run_command([sys.executable, "-m", "sft", "train", *recipe, *quick])
    assert trained.returncode == 0, trained.stderr[-3000:]
    written = (run / "chat_template.jinja").read_text(encoding="utf-8")
    assert written == load_tokenizer(str(model)).chat_template and is_derived_training_template(written)
    assert json.loads((run / "run_summary.json").read_text())["training_template"] == "derived"
    audit = [sys.executable, "-m", "sft", "audit", "--model_path", str(run), "--audit_samples", "40"]
    passed = run_command(audit)
    assert passed.returncode == 0, passed.stderr[-2000:]
    assert f"training template: derived ({run / 'chat_template.jinja'})" in passed.stdout
    assert "audit passed: 40 samples" in passed.stdout
    (run / "chat_template.jinja").write_text(written.replace("'<|im_start|>user\\n'", "'<|im_start|>user \\n'"))
    failed = run_command(audit)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "conversation 0: the training template without its generation markers differs from the official " in (
        failed.stderr
    )
    assert "template at character 16" in failed.stderr


def audit_of(tokenizer, training_template: str, conversations: list) -> list[str]:
    """The label audit's failures for `conversations` trained with `training_template` (SFTTrainer's labels)."""
    tokenizer.chat_template = training_template
    args = parse_recipe(["--config", FAMILIES["qwen2_5"].recipe, "--output_dir", "unused"]).training
    data = Dataset.from_list([{"messages": m} for m in conversations])
    samples = trl_labels(TrlPreparation(tokenizer, args, data), tokenizer, args, data)
    return audit_samples(tokenizer, tokenizer.official_chat_template, samples, None).failures


def test_a_derived_template_one_character_off_or_with_other_spans_fails_the_audit(conversations, tmp_path):
    tokenizer = load_tokenizer(str(model_with_template(tmp_path, "qwen2_5", CHATML)))
    derived = tokenizer.chat_template
    assert is_derived_training_template(derived) and audit_of(tokenizer, derived, conversations) == []
    user_turn = "'<|im_start|>user\\n'"
    assert derived.count(user_turn) == 1
    failures = audit_of(tokenizer, derived.replace(user_turn, "'<|im_start|>user \\n'"), conversations)
    assert re.match(
        r"conversation 0: the training template without its generation markers differs from the official template "
        r"at character 16: trains .*'<\|im_start\|>user \\n",
        failures[0],
    ), failures[0]
    # the end-of-turn token moved out of the span: the text is still the official one, the spans are not
    reply = "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    assert derived.count(reply) == 1
    shorter = derived.replace(reply, "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}")
    failures = audit_of(tokenizer, shorter, conversations)
    assert any(
        re.match(r"conversation 0: the derived training template's spans differ: token \d+ is not supervised", f)
        for f in failures
    ), failures[:4]


def test_a_template_that_rewrites_earlier_turns_is_refused_when_loaded(tmp_path):
    variant = tmp_path / "qwen3_variant.jinja"
    variant.write_text(qwen3_chat_template + "{#- a local variant: no training form of it exists #}")
    with pytest.raises(UserError, match="the chat template rewrites earlier turns .* `chat_template_path`"):
        load_tokenizer(str(tiny_model_of("qwen3")), chat_template_path=str(variant))
    generating = load_tokenizer(str(tiny_model_of("qwen3")), chat_template_path=str(variant), need_reply_markers=False)
    assert generating.chat_template == variant.read_text()  # chatting needs no markers: the template as it is


def test_a_template_that_rewrites_earlier_turns_is_refused(conversations):
    """Qwen3's official template writes a think block before the last reply only: appending a reply rewrites the
    one before it, so no span of the whole conversation is what the reply added."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_of("qwen3"))
    tokenizer.chat_template = qwen3_chat_template
    multi_turn = next(m for m in conversations if sum(x["role"] == "assistant" for x in m) > 1)
    with pytest.raises(UserError, match="rewrites earlier turns .* `chat_template_path`"):
        derived_reply_mask(tokenizer, multi_turn)


def test_a_generation_prompt_that_is_not_where_the_reply_starts_is_refused(conversations):
    """R1-Distill's generation prompt opens a think block its rendering of a reply does not have (hence our
    training template for it)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_of("r1_distill"))
    tokenizer.chat_template = deepseek_r1_distill_chat_template
    with pytest.raises(UserError, match=r"generation prompt .*<think>\\n' is not how it renders the start of reply"):
        derived_reply_mask(tokenizer, conversations[0])


@pytest.mark.slow
def test_training_refuses_a_history_rewriting_template_before_loading_the_model(conversations, tmp_path):
    variant = tmp_path / "qwen3_variant.jinja"
    variant.write_text(qwen3_chat_template + "{#- a local variant: no training form of it exists #}")
    recipe = parse_recipe(
        ["--config", "recipes/smoke_qwen3.yaml", "--output_dir", str(tmp_path), "--chat_template_path", str(variant)]
    )
    tiny_model_of("qwen3")
    data = Dataset.from_list([{"messages": m} for m in conversations])
    with pytest.raises(UserError, match="the chat template rewrites earlier turns"):
        build_trainer(recipe, DatasetDict(train=data, validation=data))
