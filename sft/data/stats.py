"""What `stats.json` says about prepared samples: utterances per sample and, with a tokenizer, token lengths."""

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset
from trl.data_utils import common_prefix_length

from sft.common.files import write_atomically
from sft.common.template import reply_masked_tokens
from sft.data.pipeline import subset

STATS_FILE = "stats.json"


def utterance_counts(ds: Dataset) -> np.ndarray:
    """User and assistant messages per sample, counted on the Arrow columns without decoding rows."""
    counts = np.zeros(len(ds), dtype=np.int64)
    for name in set(ds.column_names) & {"messages", "prompt", "completion"}:
        offset = 0
        for chunk in ds.data.column(name).chunks:
            roles = pc.struct_field(pc.list_flatten(chunk), "role")
            spoken = pc.not_equal(roles, "system").to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(chunk).to_numpy()
            counts[offset : offset + len(chunk)] += np.bincount(parents[spoken], minlength=len(chunk))
            offset += len(chunk)
    return counts


def summary(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    return {
        "mean": round(float(values.mean()), 2),
        "p50": round(float(np.percentile(values, 50)), 1),
        "p95": round(float(np.percentile(values, 95)), 1),
        "max": int(values.max()),
    }


def write_stats(folder: Path, stats: dict) -> None:
    write_atomically(folder / STATS_FILE, json.dumps(stats, indent=2, ensure_ascii=False))


def token_counts(sample: dict, tokenizer) -> tuple[int, int, int, int]:
    """Tokens of one sample as SFTTrainer builds it, how many of them carry the loss, and the characters of its
    messages with the tokens that spell them alone (no template)."""
    conversation = sample.get("messages") or sample["prompt"] + sample["completion"]
    texts = [message["content"] for message in conversation]
    text_tokens = sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    encoded = reply_masked_tokens(tokenizer, conversation)
    ids, supervised = encoded["input_ids"], encoded["assistant_masks"]
    start = 0
    if sample.get("prompt"):  # per_turn: only the completion is a target, as in TRL's prompt/completion loss
        prompt = tokenizer.apply_chat_template(
            sample["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True
        )["input_ids"]
        start = common_prefix_length(prompt, ids)
    return len(ids), int(sum(supervised[start:])), sum(map(len, texts)), text_tokens


def token_summary(ds: Dataset, tokenizer, max_length: int | None, count: int, seed: int) -> dict:
    """Token lengths (p50/p95/max), the share `max_length` would truncate, tokens per supervised token, and
    characters per token of the messages' text (how well the tokenizer spells the language)."""
    measured = ds.select(subset(len(ds), count, seed))
    if not len(measured):
        return {"samples_measured": 0}
    counts = np.array([token_counts(sample, tokenizer) for sample in measured])
    tokens, supervised, characters, text_tokens = counts.T
    lengths = summary(tokens)
    return {
        "samples_measured": len(measured),
        "p50": lengths["p50"],
        "p95": lengths["p95"],
        "max": lengths["max"],
        "truncated_share": round(float((tokens > max_length).mean()), 4) if max_length else 0.0,
        "tokens_per_supervised_token": round(float(tokens.sum() / max(supervised.sum(), 1)), 3),
        "characters_per_token": round(float(characters.sum() / max(text_tokens.sum(), 1)), 3),
    }
