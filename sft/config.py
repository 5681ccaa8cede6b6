"""Recipes: YAML files whose keys are TRL/transformers dataclass arguments plus our data arguments.

Values from the recipe become the parser's defaults and `--flag` overrides on the command line win, as with
TRL's own `TrlParser`; on top of that every key and value is checked before anything is loaded.
"""

import argparse
import difflib
import enum
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from trl import ModelConfig, SFTConfig, TrlParser

from sft.errors import UserError
from sft.files import write_atomically


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
    """What to do with an output folder that already holds a run."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start from scratch: delete an earlier run's checkpoints and outputs in output_dir."},
    )


RECIPE_DATACLASSES = (DataArguments, SFTConfig, ModelConfig, RunArguments)
SECRET_KEYS = {"hub_token"}
# How to start, not what to train: left out of recipe.yaml so a rerun with or without them still resumes.
RUN_CONTROL_KEYS = {"overwrite_output_dir", "resume_from_checkpoint"}
RECIPE_FILE = "recipe.yaml"  # the resolved recipe, next to what a run trained
# Values no run can use: (part of the recipe, key, check, what is needed).
VALUE_RULES = [
    ("training", "learning_rate", lambda v: v > 0, "a positive number"),
    ("training", "per_device_train_batch_size", lambda v: v >= 1, "at least 1"),
    ("training", "gradient_accumulation_steps", lambda v: v >= 1, "at least 1"),
    ("training", "num_train_epochs", lambda v: v > 0, "a positive number"),
    ("training", "max_length", lambda v: v is None or v >= 8, "at least 8 tokens"),
    ("training", "warmup_steps", lambda v: v >= 0, "zero or more"),
    ("model", "lora_r", lambda v: v >= 1, "at least 1"),
    ("model", "lora_alpha", lambda v: v > 0, "a positive number"),
    ("model", "lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
]


class RecipeParser(TrlParser):
    """TRL's parser, reporting a bad command-line value as a UserError instead of a page of usage."""

    def error(self, message):
        raise UserError(message)


@dataclass
class Recipe:
    """The parsed arguments, and the user's choices (recipe keys and flags) with their values as parsed."""

    data: DataArguments
    training: SFTConfig
    model: ModelConfig
    run: RunArguments
    resolved: dict


def resolve_choices(chosen: list[str], parts: tuple) -> dict:
    """The chosen keys with their final values, secrets and run controls left out: what `recipe.yaml` records."""
    out = {}
    for key in dict.fromkeys(chosen):
        owner = next(part for part in parts if hasattr(part, key))
        if key not in SECRET_KEYS | RUN_CONTROL_KEYS:
            out[key] = _plain(getattr(owner, key))
    return out


def _plain(value):
    """A YAML-friendly copy of an argument value."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_recipe_file(path: str) -> dict:
    """Load a recipe YAML safely, with one clear message for a missing file or a syntax error."""
    recipe_path = Path(path)
    if not recipe_path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path} must be a mapping of `key: value` lines")
    return recipe


def take_recipe(argv: list[str]) -> tuple[dict, list[str]]:
    """Split `--config recipe.yaml` off the command line: the recipe (its `env:` applied) and the other words."""
    args, recipe = [], {}
    for arg in argv:  # `--config=path` is `--config path`
        args += arg.split("=", 1) if arg.startswith("--config=") else [arg]
    if "--config" in args:
        at = args.index("--config")
        if at + 1 >= len(args):
            raise UserError("--config needs a recipe path, e.g. --config recipes/smoke.yaml")
        recipe = read_recipe_file(args[at + 1])
        del args[at : at + 2]
    env = recipe.pop("env", None) or {}
    if not isinstance(env, dict):
        raise UserError("recipe key `env` must be a mapping of variables, e.g. `env: {WANDB_PROJECT: lccc}`")
    for name, value in env.items():
        os.environ[str(name)] = str(value)
    return recipe, args


def did_you_mean(key: str, known) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _coerce(action, key: str, value):
    """Convert a YAML value with the argparse type of its field, or explain what was expected."""
    if value is None:
        return None
    if action.nargs in ("+", "*"):
        return [_coerce_one(action, key, v) for v in (value if isinstance(value, list) else [value])]
    return _coerce_one(action, key, value)


def _coerce_one(action, key: str, value):
    if isinstance(value, (dict, list)) or action.type is None:
        return value
    expected = getattr(action.type, "__name__", "a valid value")
    if isinstance(value, bool) and action.type in (int, float):
        raise UserError(f"recipe key `{key}`: expected {expected}, got {value!r}")
    try:
        converted = action.type(str(value) if not isinstance(value, str) else value)
    except (TypeError, ValueError, KeyError, argparse.ArgumentTypeError):
        raise UserError(f"recipe key `{key}`: expected {expected}, got {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(str(_plain(c)) for c in action.choices)
        raise UserError(f"recipe key `{key}`: {value!r} is not one of {choices}")
    return converted


def flag_names(cli_args: list[str]) -> list[str]:
    return [arg[2:].split("=", 1)[0] for arg in cli_args if arg.startswith("--")]


def parse_recipe(argv: list[str]) -> Recipe:
    """Parse `--config recipe.yaml` plus `--flag value` overrides into checked dataclasses."""
    parser = RecipeParser(RECIPE_DATACLASSES)
    recipe, args = take_recipe(argv)
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    defaults = {}
    for key, value in recipe.items():
        if key not in actions:
            raise UserError(f"unknown recipe key `{key}`{did_you_mean(key, actions)}")
        defaults[key] = _coerce(actions[key], key, value)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        defaults.setdefault("use_cpu", True)  # several processes and no GPU: train together on the CPU (gloo)
    parser.set_defaults_with_config(**defaults)

    for flag in flag_names(args):
        if flag not in actions and flag.replace("-", "_") not in actions:
            raise UserError(f"unknown option `--{flag}`{did_you_mean(flag, actions)}")
    try:
        data, training, model, run, unused = parser.parse_args_into_dataclasses(
            args=args, return_remaining_strings=True
        )
    except ValueError as err:
        message = str(err).splitlines()[0]
        if "support bf16" in message:
            message = (
                "bf16 is on (TRL's default) but this machine has no bf16 support: set `bf16: false` in the recipe "
                "or pass `--bf16 false`, and `--fp16 true` on a GPU without bf16"
            )
        raise UserError(f"invalid recipe value: {message}") from None
    if unused:
        raise UserError(f"could not use these command-line words: {' '.join(unused)}")
    chosen = [*recipe, *(f.replace("-", "_") for f in flag_names(args))]
    resolved = resolve_choices(chosen, (data, training, model, run))
    parsed = Recipe(data=data, training=training, model=model, run=run, resolved=resolved)
    check_values(parsed)
    return parsed


def check_values(recipe: Recipe) -> None:
    """Refuse values that parse but no run can use (a negative learning rate, `lora_r: 0`, ...)."""
    for part, key, is_valid, needed in VALUE_RULES:
        value = getattr(getattr(recipe, part), key)
        if not is_valid(value):
            raise UserError(f"`{key}` must be {needed}, got {value!r}")


def save_resolved_recipe(recipe: Recipe, output_dir: str) -> Path:
    """Write the user's choices with their final values next to the trained adapter."""
    path = Path(output_dir) / RECIPE_FILE
    write_atomically(path, yaml.safe_dump(recipe.resolved, allow_unicode=True, sort_keys=False))
    return path
