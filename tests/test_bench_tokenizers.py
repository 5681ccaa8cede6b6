"""The tokens-per-character benchmark's DeepSeek-R1-Distill-Qwen tokenizer: Qwen2.5's vocabulary with R1's tokens at
their real ids, so its text row is measured on the real vocabulary (Qwen's ranks ship in the dev dependency)."""

import pytest
from trl.chat_template_utils import deepseek_r1_distill_chat_template, qwen2_5_chat_template

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
