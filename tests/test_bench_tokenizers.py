"""The tokens-per-character benchmark's DeepSeek-R1-Distill-Qwen tokenizer: Qwen2.5's vocabulary with R1's tokens at
their real ids, so its text row is measured on the real vocabulary (Qwen's ranks ship in the dev dependency); and its
Qwen3-Instruct-2507 row, measured with Qwen2.5's tokenizer."""

import pytest
from test_families import tiny_model_of
from transformers import AutoTokenizer
from trl.chat_template_utils import (
    deepseek_r1_distill_chat_template,
    qwen2_5_chat_template,
    qwen3_instruct_2507_chat_template,
)

from benchmarks.bench_tokenizers import measure, qwen2_5_tokenizer, r1_distill_tokenizer

pytestmark = pytest.mark.slow  # two 151k-token vocabularies built from Qwen's ranks: several seconds

CONVERSATION = [{"role": "user", "content": "周末去爬山了吗？"}, {"role": "assistant", "content": "去了，风景特别好。"}]


def test_r1_distill_has_qwen2_5s_vocabulary_and_r1s_tokens_at_their_ids():
    r1, qwen = r1_distill_tokenizer(), qwen2_5_tokenizer()
    ids = {token: r1.convert_tokens_to_ids(token) for token in ("<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>")}
    assert ids == {"<｜end▁of▁sentence｜>": 151643, "<｜begin▁of▁sentence｜>": 151646}
    text = "".join(m["content"] for m in CONVERSATION)
    assert r1(text, add_special_tokens=False)["input_ids"] == qwen(text, add_special_tokens=False)["input_ids"]
    rendered = r1.apply_chat_template(CONVERSATION, chat_template=deepseek_r1_distill_chat_template, return_dict=True)[
        "input_ids"
    ]
    assert rendered.count(151646) == 1 and rendered[0] == 151646  # one BOS, written by the template
    r1_row = measure(r1, deepseek_r1_distill_chat_template, [CONVERSATION])
    qwen_row = measure(qwen, qwen2_5_chat_template, [CONVERSATION])
    assert r1_row["tokens_per_character"] == qwen_row["tokens_per_character"]
    # R1's template adds one BOS, one header per message and the end-of-turn token to the text
    assert r1_row["tokens_per_sample_mean"] == r1_row["text_tokens_per_sample_mean"] + 4


def test_qwen3_instruct_2507_is_measured_with_its_models_tokens_and_no_default_system_prompt():
    """The row reuses Qwen2.5's tokenizer: Qwen3-Instruct-2507's model tokenizes its official text alike."""
    qwen, tiny = qwen2_5_tokenizer(), AutoTokenizer.from_pretrained(tiny_model_of("qwen3_2507"))
    rendered = qwen.apply_chat_template(CONVERSATION, chat_template=qwen3_instruct_2507_chat_template, return_dict=True)
    assert rendered["input_ids"] == tiny.apply_chat_template(CONVERSATION, return_dict=True)["input_ids"]
    row = measure(qwen, qwen3_instruct_2507_chat_template, [CONVERSATION])
    # `<|im_start|>` role newline ... `<|im_end|>` newline per message, and no system turn (Qwen2.5 writes one)
    assert row["tokens_per_sample_mean"] == row["text_tokens_per_sample_mean"] + 10
