"""Build the smoke run's model: a tiny random Llama with a Llama-style SentencePiece BPE tokenizer.

`python -m sft.tiny --output_dir build/tiny-llama` (or `make tiny-model`). The tokenizer is trained on the
shipped LCCC sample with byte fallback, so `<s>`, `</s>` and `[INST]` behave as with Llama-2; the model is
a few layers with random weights and a fixed seed. It checks the pipeline; it is no chatbot.
"""

import argparse
import io
import json
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from sft.data import normalize_utterance
from sft.model import TINY_MODEL_DIR
from sft.template import LLAMA2_TRAINING_TEMPLATE, strip_generation_markers

SAMPLE_DATA = Path(__file__).parent / "assets" / "lccc_sample.json"
DEFAULT_OUTPUT = TINY_MODEL_DIR
# Llama-2's special-token ids, and the chat format's markers so that BPE learns pieces for them.
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
FORMAT_LINES = ["[INST] [/INST]", "<<SYS>>", "<</SYS>>"] * 20


def sample_sentences(path: Path = SAMPLE_DATA) -> list[str]:
    splits = json.loads(path.read_text(encoding="utf-8"))
    return [normalize_utterance(u) for dialogues in splits.values() for d in dialogues for u in d] + FORMAT_LINES


def train_tokenizer(sentences: list[str], vocab_size: int = 3000) -> LlamaTokenizer:
    """A SentencePiece BPE model with byte fallback, converted to a Llama tokenizer with Llama-2's chat template."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
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


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    return LlamaForCausalLM(config)


def build_tiny_llama(output_dir: str = DEFAULT_OUTPUT) -> Path:
    tokenizer = train_tokenizer(sample_sentences())
    model = build_model(len(tokenizer))
    out = Path(output_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT)
    out = build_tiny_llama(parser.parse_args(argv).output_dir)
    print(f"tiny Llama model and tokenizer written to {out}")


if __name__ == "__main__":
    main()
