"""Preference recipes: a finished SFT run (`sft_run:`), where the pairs come from, and TRL's `DPOConfig` (or, with
`method: orpo`, the `ORPOConfig` of TRL's experimental ORPO trainer).

The model side (base, 4-bit, LoRA) is the SFT run's own, read from its `recipe.yaml`; the recipe sets only what
preference tuning adds. Every `DPOConfig` (`ORPOConfig`) field works as a recipe key and as a `--flag`.
"""

from dataclasses import dataclass, field
from pathlib import Path

from trl import DPOConfig, ModelConfig

from sft.common.arguments import parse_arguments, read_recipe_file, take_recipe
from sft.common.config import RunArguments, check_values, resolve_choices
from sft.common.errors import UserError
from sft.common.inference import Run, read_run, resolve_local

PREFERENCE_KEY = "sft_run"  # a recipe naming it is a preference recipe
METHODS = ("dpo", "orpo")  # TRL's DPOTrainer (the SFT adapter as reference), or its experimental ORPOTrainer (none)


@dataclass
class PreferenceArguments:
    """Which SFT run to continue, and the pairs: a file of the user's own, or mined from the run's failures."""

    sft_run: str = field(default=None, metadata={"help": "Output folder of the finished SFT run to continue."})
    method: str = field(
        default="dpo",
        metadata={
            "help": "dpo: TRL's DPOTrainer, the SFT adapter as reference; orpo: TRL's experimental ORPOTrainer "
            "(odds-ratio loss plus the chosen replies' NLL, no reference).",
            "choices": METHODS,
        },
    )
    pairs_file: str | None = field(
        default=None,
        metadata={
            "help": "JSON/JSONL preference pairs: prompt/chosen/rejected (text or conversational) or chosen/rejected "
            "conversations. Default: pairs mined from the SFT run (`lccc-sft pairs`)."
        },
    )
    pairs_dir: str | None = field(
        default=None, metadata={"help": "Where mined pairs are written and reused; default: <sft_run>/pairs."}
    )
    mine_contexts: int = field(
        default=512, metadata={"help": "Held-in training contexts the SFT model answers when mining pairs."}
    )
    mine_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Longest reply generated when mining; default: the SFT run's setting."}
    )
    mine_batch_size: int = field(default=16, metadata={"help": "Contexts per generation batch when mining."})
    mine_sample: bool = field(
        default=False, metadata={"help": "Mine sampled replies (the run's sampling settings) instead of greedy ones."}
    )
    generic_replies: int = field(
        default=20,
        metadata={"help": "A reply among this many most frequent replies of the training data is generic."},
    )
    max_malformed_share: float = field(
        default=0.01,
        metadata={"help": "Skip malformed pair records up to this share of the file; stop when there are more."},
    )

    def __post_init__(self):
        for name in ("mine_contexts", "mine_batch_size", "generic_replies"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.max_malformed_share <= 1:
            raise ValueError(f"max_malformed_share must be in [0, 1], got {self.max_malformed_share}")

    @property
    def mined_dir(self) -> Path:
        return Path(self.pairs_dir or Path(self.sft_run) / "pairs")


@dataclass
class PreferenceRecipe:
    """A preference run: its own arguments, DPOConfig, the SFT run's model settings, and what recipe.yaml records."""

    preference: PreferenceArguments
    training: DPOConfig  # an ORPOConfig for `method: orpo`
    model: ModelConfig
    run: RunArguments
    sft: Run
    resolved: dict


def is_preference_recipe(argv: list[str]) -> bool:
    """Whether a command line's recipe (or a flag) names an SFT run to continue."""
    recipe, args = take_recipe(list(argv))
    return PREFERENCE_KEY in recipe or any(arg.split("=", 1)[0] == f"--{PREFERENCE_KEY}" for arg in args)


def training_config_class(argv: list[str]) -> type:
    """DPOConfig, or trl.experimental's ORPOConfig when the recipe or `--method` says orpo."""
    recipe, args = take_recipe(list(argv))
    method = recipe.get("method", "dpo")
    for at, arg in enumerate(args):
        if arg == "--method" and at + 1 < len(args):
            method = args[at + 1]
        elif arg.startswith("--method="):
            method = arg.split("=", 1)[1]
    if method != "orpo":
        return DPOConfig  # an unknown method is refused by the argument's choices
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig


def read_sft_run(path: str | None) -> Run:
    """The finished SFT run a preference recipe continues: its adapter and recipe, refused when unfinished."""
    if not path:
        raise UserError(f"a preference recipe needs `{PREFERENCE_KEY}`: the output folder of a finished SFT run")
    run = read_run(resolve_local(path))
    if not run.is_adapter or not (run.model_path / "run_summary.json").is_file():
        raise UserError(f"{path} is not a finished SFT run (no adapter and run_summary.json); train it first")
    return run


def parse_preference_recipe(argv: list[str]) -> PreferenceRecipe:
    """Parse a preference recipe plus `--flag value` overrides; the model settings come from the SFT run."""
    config = training_config_class(argv)
    parsed = parse_arguments((PreferenceArguments, config, RunArguments), argv, prog="lccc-sft dpo")
    preference, training, run_args = parsed.values
    sft = read_sft_run(preference.sft_run)
    preference.sft_run = str(sft.model_path)
    training.trust_remote_code = sft.trust_remote_code
    choices = resolve_choices(parsed.chosen, parsed.values)
    # the SFT run's choices, then this stage's: read by eval, chat, merge and serve as an SFT run's recipe.yaml
    resolved = {**read_recipe_file(str(sft.model_path / "recipe.yaml")), **choices}
    recipe = PreferenceRecipe(preference, training, sft.model_args, run_args, sft, resolved)
    check_values(recipe)
    return recipe
