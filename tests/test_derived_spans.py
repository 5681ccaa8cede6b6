"""Any chat model: a template with no training form of ours or TRL's trains on the reply spans derived from it
(what rendering adds when a reply is appended), and a template that rewrites earlier turns is refused."""

import shutil
from types import SimpleNamespace

import pytest
from datasets import Dataset, DatasetDict
from test_families import tiny_model_of
from test_template import HANDWRITTEN, lccc_conversations
from transformers import AutoTokenizer
from trl.chat_template_utils import deepseek_r1_distill_chat_template, qwen3_chat_template

from sft.common.config import parse_recipe
from sft.common.errors import UserError
from sft.common.model import load_tokenizer
from sft.common.template import derived_reply_mask
from sft.tiny import SAMPLE_DATA
from sft.train.audit import audit_before_training
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


@pytest.fixture(scope="module")
def conversations():
    return HANDWRITTEN + lccc_conversations(SAMPLE_DATA, 20)


@pytest.fixture(scope="module")
def zephyr_model(tmp_path_factory):
    """The tiny Llama with Zephyr's chat template instead of Llama-2's."""
    path = tmp_path_factory.mktemp("tiny-zephyr")
    shutil.copytree(tiny_model_of("llama"), path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = ZEPHYR
    tokenizer.save_pretrained(path)
    return path


def hand_marked_masks(tokenizer, messages):
    return tokenizer.apply_chat_template(
        messages, chat_template=ZEPHYR_MARKED, return_dict=True, return_assistant_tokens_mask=True
    )


def test_the_derived_spans_are_the_hand_marked_replies_and_their_end_of_turn(zephyr_model, conversations):
    tokenizer = load_tokenizer(str(zephyr_model))
    assert tokenizer.chat_template == ZEPHYR == tokenizer.official_chat_template  # trained as it is
    for messages in conversations:
        derived = derived_reply_mask(tokenizer, messages)
        expected = hand_marked_masks(tokenizer, messages)
        assert derived["input_ids"] == list(expected["input_ids"])
        assert derived["assistant_masks"] == list(expected["assistant_masks"])


@pytest.mark.slow
def test_a_model_without_a_training_template_trains_on_the_derived_spans(zephyr_model, conversations, tmp_path):
    args = ["--config", "recipes/smoke.yaml", "--output_dir", str(tmp_path), "--max_length", "1024"]
    recipe = parse_recipe([*args, "--model_name_or_path", str(zephyr_model), "--max_steps", "2"])
    data = Dataset.from_list([{"messages": m} for m in conversations])
    trainer = build_trainer(recipe, DatasetDict(train=data, validation=data.select(range(2))))
    tokenizer = trainer.processing_class
    supervised = sum(sum(label != -100 for label in row["labels"]) for row in trainer.train_dataset)
    expected = sum(sum(hand_marked_masks(tokenizer, m)["assistant_masks"]) for m in conversations)
    assert supervised == expected > 0
    replies = sum(m["role"] == "assistant" for c in conversations for m in c)
    assert sum(row["labels"].count(tokenizer.eos_token_id) for row in trainer.train_dataset) == replies
    report = audit_before_training(trainer, recipe.training, tokenizer.official_chat_template, data)
    assert report.samples == len(conversations) and not report.failures
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.gathered_counts()[0, 2] > 0


def test_spans_are_derived_only_for_assistant_only_loss(zephyr_model, conversations):
    tokenizer = load_tokenizer(str(zephyr_model))
    data = DatasetDict(train=Dataset.from_list([{"messages": m} for m in conversations[:3]]))
    whole = SimpleNamespace(assistant_only_loss=False)  # loss on every token: nothing to derive
    assert with_derived_reply_spans(whole, tokenizer, data) == (whole, data)
    args, derived = with_derived_reply_spans(SimpleNamespace(assistant_only_loss=True), tokenizer, data)
    assert not args.assistant_only_loss and {"input_ids", "assistant_masks"} <= set(derived["train"].column_names)


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
