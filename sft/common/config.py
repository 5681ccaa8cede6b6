"""Recipes: YAML files whose keys are TRL/transformers dataclass arguments plus our data arguments.

Values from the recipe become the parser's defaults and `--flag` overrides on the command line win, as with
TRL's own `TrlParser`; on top of that every key and value is checked before anything is loaded.
"""

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from trl import ModelConfig, SFTConfig

from sft.common.arguments import flag_names, parse_arguments, plain
from sft.common.errors import UserError
from sft.common.files import check_not_inside, check_writable_folder, write_atomically

# The training argument that turns activation checkpointing on: `activation_checkpointing` since transformers 5.23,
# `gradient_checkpointing` before (sft/common/arguments.py reads a recipe's newer name as the older one there).
CHECKPOINTING = next(
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in {f.name for f in fields(SFTConfig)}
)


@dataclass
class DataArguments:
    """Where the dialogues come from, how they are cleaned and how they become chat samples (see sft/data/)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hub dataset id (thu-coai/lccc; lccc-base and lccc name its base and large configs) or a "
            "local file: LCCC JSON, JSON list, JSONL, tab-separated .txt/.tsv or .parquet, optionally .gz-compressed."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Hub dataset config: `base` (the default for LCCC) or `large`."}
    )
    data_format: str = field(
        default="auto",
        metadata={
            "help": "Format of the records: dialogue (LCCC utterance lists), messages, alpaca or sharegpt; "
            "auto: judged from the first record's fields.",
            "choices": ["auto", "dialogue", "messages", "alpaca", "sharegpt"],
        },
    )
    dataset_split: str | None = field(
        default=None,
        metadata={"help": "Read only this split of the source, and carve validation/test from it."},
    )
    datasets: list[dict] | None = field(
        default=None,
        metadata={
            "help": "Several sources to mix instead of one dataset_name, in a recipe: a list of {path, name, split, "
            "format, weight or samples, label, and any data argument for that source} (see the README)."
        },
    )
    dialogue_column: str | None = field(
        default=None,
        metadata={
            "help": "Field holding each dialogue; default: dialog, dialogue, conversation, utterances or messages."
        },
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Read at most this many dialogues from each split of the source."}
    )
    max_turns: int = field(
        default=3,
        metadata={"help": "Most turns (one user message plus its reply) in one training sample."},
    )
    sample_format: str = field(
        default="multi_turn",
        metadata={
            "help": "multi_turn: one sample per window of turns, every reply a target; per_turn: one sample per "
            "reply with the history as prompt (prompt/completion).",
            "choices": ["multi_turn", "per_turn"],
        },
    )
    both_speakers: bool = field(
        default=False,
        metadata={"help": "Also train on the other speaker's replies (each dialogue again, shifted by one)."},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt put before every sample."})
    max_utterance_length: int | None = field(
        default=None,
        metadata={"help": "Cut a dialogue before its first utterance longer than this many characters."},
    )
    val_size: float = field(
        default=0.1,
        metadata={"help": "Share of dialogues held out for evaluation when the data has no validation split."},
    )
    test_size: float = field(
        default=0.05,
        metadata={"help": "Share of dialogues held out as the test split when the data has none."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval samples."})
    max_malformed_share: float = field(
        default=0.01,
        metadata={"help": "Skip malformed records up to this share of the source; stop when there are more."},
    )
    processed_dir: str = field(
        default="data/processed",
        metadata={"help": "Cache of prepared data: one folder per set of data arguments, reused while unchanged."},
    )
    num_proc: int | None = field(
        default=None, metadata={"help": "Processes for cleaning and conversion; default: all cores for large data."}
    )

    def __post_init__(self):
        if self.datasets and self.dataset_name:
            raise ValueError("give either dataset_name or datasets (a mixture), not both")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {self.max_turns}")
        if self.sample_format not in ("multi_turn", "per_turn"):
            raise ValueError(f"sample_format must be multi_turn or per_turn, got {self.sample_format!r}")
        for name in ("val_size", "test_size"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.val_size + self.test_size >= 1:
            raise ValueError(f"val_size + test_size must be below 1, got {self.val_size + self.test_size}")
        for name in ("max_samples", "max_utterance_length", "max_train_samples", "max_eval_samples", "num_proc"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.max_malformed_share <= 1:
            raise ValueError(f"max_malformed_share must be in [0, 1], got {self.max_malformed_share}")


@dataclass
class RunArguments:
    """What to do with an output folder that already holds a run, whether to only show the plan, when to stop."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start from scratch: delete an earlier run's checkpoints and outputs in output_dir."},
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "Print what the run would decide (precision, attention, placement, steps) and stop."},
    )
    stop_after_bad_steps: int = field(
        default=3,
        metadata={
            "help": "Stop the run after this many logged steps in a row whose loss or gradient norm is NaN or "
            "infinite, or whose loss is exactly 0, keeping the last good checkpoint; 0 turns the watch off."
        },
    )
    gpu: str | None = field(
        default=None,
        metadata={
            "help": "Plan for this GPU instead of this machine (with --dry_run): T4, L4, A10, 4090, A100-40GB, A100, "
            "H100 or H200 (sft/train/gpus.py)"
        },
    )


RECIPE_DATACLASSES = (DataArguments, SFTConfig, ModelConfig, RunArguments)
SECRET_KEYS = {"hub_token"}
# How to start, not what to train: left out of recipe.yaml so a rerun with or without them still resumes.
RUN_CONTROL_KEYS = {"overwrite_output_dir", "resume_from_checkpoint", "dry_run", "stop_after_bad_steps", "gpu"}
RECIPE_FILE = "recipe.yaml"  # the resolved recipe, next to what a run trained
RUN_SUMMARY = "run_summary.json"  # written last by a finished run; its `dtype` is the precision it trained in
# Values no run can use: (part of the recipe, key, check, what is needed).
VALUE_RULES = [
    ("training", "learning_rate", lambda v: v > 0, "a positive number"),
    ("training", "per_device_train_batch_size", lambda v: v >= 1, "at least 1"),
    ("training", "per_device_eval_batch_size", lambda v: v >= 1, "at least 1"),
    ("training", "gradient_accumulation_steps", lambda v: v >= 1, "at least 1"),
    ("training", "num_train_epochs", lambda v: v > 0, "a positive number"),
    ("training", "max_length", lambda v: v is None or v >= 8, "at least 8 tokens"),
    ("training", "warmup_steps", lambda v: v >= 0, "zero or more"),
    ("training", "save_steps", lambda v: v > 0, "a positive number (a share of the run when below 1)"),
    ("training", "eval_steps", lambda v: v is None or v > 0, "a positive number (a share of the run when below 1)"),
    ("training", "logging_steps", lambda v: v > 0, "a positive number (a share of the run when below 1)"),
    ("model", "lora_r", lambda v: v >= 1, "at least 1"),
    ("run", "stop_after_bad_steps", lambda v: v >= 0, "zero (off) or more"),
    ("model", "lora_alpha", lambda v: v > 0, "a positive number"),
    ("model", "lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
]


@dataclass
class Recipe:
    """The parsed arguments, and the user's choices (recipe keys and flags) with their values as parsed."""

    data: DataArguments
    training: SFTConfig
    model: ModelConfig
    run: RunArguments
    resolved: dict


def training_default(name: str):
    """TRL's SFTConfig default for a training key a recipe leaves out (seed, max_length, ...)."""
    return SFTConfig.__dataclass_fields__[name].default


def resolve_choices(chosen: list[str], parts: tuple) -> dict:
    """The chosen keys with their final values, secrets and run controls left out: what `recipe.yaml` records."""
    out = {}
    for key in dict.fromkeys(chosen):
        owner = next(part for part in parts if hasattr(part, key))
        if key not in SECRET_KEYS | RUN_CONTROL_KEYS:
            out[key] = plain(getattr(owner, key))
    return out


def parse_recipe(argv: list[str]) -> Recipe:
    """Parse `--config recipe.yaml` plus `--flag value` overrides into checked dataclasses."""
    defaults = {}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        defaults["use_cpu"] = True  # several processes and no GPU: train together on the CPU (gloo)
    if "gpu" in flag_names(argv) and not torch.cuda.is_available():
        defaults["use_cpu"] = True  # a plan for a named GPU made here: its bf16 is that GPU's (sft/train/gpus.py)
    parsed = parse_arguments(RECIPE_DATACLASSES, argv, defaults=defaults)
    data, training, model, run = parsed.values
    resolved = resolve_choices(parsed.chosen, parsed.values)
    recipe = Recipe(data=data, training=training, model=model, run=run, resolved=resolved)
    check_values(recipe)
    return recipe


def check_values(recipe: Recipe) -> None:
    """Refuse values that parse but no run can use (a negative learning rate, `lora_r: 0`, ...), and places a run
    cannot write to, before anything is loaded."""
    for part, key, is_valid, needed in VALUE_RULES:
        value = getattr(getattr(recipe, part), key)
        if not is_valid(value):
            raise UserError(f"`{key}` must be {needed}, got {value!r}")
    check_attention(recipe.model.attn_implementation)
    check_trackers(recipe.training.report_to)
    check_places(recipe)


def check_attention(name: str | None) -> None:
    """An attention implementation transformers knows (or a Hub kernel, `org/name`), else it fails after loading."""
    from transformers import AttentionInterface

    known = ["eager", *AttentionInterface().valid_keys()]
    if name is not None and "/" not in name and name not in known:
        raise UserError(f"unknown attn_implementation {name!r}: use one of {', '.join(known)}")


def check_trackers(report_to: list[str] | str | None) -> None:
    """Each tracker in `report_to` is one transformers knows and installed here (else the run fails after loading)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    names = [report_to] if isinstance(report_to, str) else report_to or []
    installed = get_available_reporting_integrations()
    for name in names:
        if name in ("none", "all") or name in installed:
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise UserError(f"report_to: unknown tracker {name!r}; known: {', '.join(INTEGRATION_TO_CALLBACK)}")
        raise UserError(f"report_to: {name} is not installed here; `pip install {name}` or leave it out of report_to")


def check_places(recipe: Recipe) -> None:
    """The output folder can be written and is not the base model's own folder; a checkpoint to resume exists."""
    output_dir = recipe.training.output_dir
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes there: other ranks may see it read-only
        check_writable_folder(output_dir, "output_dir")
    base = recipe.model.model_name_or_path
    if base and Path(base).is_dir():
        check_not_inside(output_dir, base, "output_dir", "the base model's folder (model_name_or_path)")
    resume = recipe.training.resume_from_checkpoint
    if resume and not Path(resume).is_dir():
        raise UserError(f"resume_from_checkpoint {resume} is not a folder: give a checkpoint-* folder of a run")


def save_resolved_recipe(recipe: Recipe, output_dir: str) -> Path:
    """Write the user's choices with their final values next to the trained adapter."""
    path = Path(output_dir) / RECIPE_FILE
    write_atomically(path, yaml.safe_dump(recipe.resolved, allow_unicode=True, sort_keys=False))
    return path
