"""Generation settings, one set for every command that generates (eval, chat, serve)."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from sft.common.errors import UserError


@dataclass
class GenerationArguments:
    """How replies are decoded. Sampling defaults follow the LCCC paper: nucleus sampling, p=0.9, temperature 0.7."""

    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens in one reply."})
    do_sample: bool = field(
        default=True, metadata={"help": "Sample replies (nucleus sampling); `--do_sample false` decodes greedily."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (LCCC paper: 0.7)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling p (LCCC paper: 0.9)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k likeliest tokens only; 0 switches it off."})
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Above 1 makes tokens already in the prompt or reply less likely."}
    )
    no_repeat_ngram_size: int = field(
        default=0, metadata={"help": "Never repeat an n-gram of this many tokens; 0 switches it off."}
    )
    seed: int | None = field(default=None, metadata={"help": "Sampling seed (default: the run's training seed)."})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise UserError("--top_k and --no_repeat_ngram_size must be 0 (off) or more")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition_penalty must be positive, got {self.repetition_penalty}")


def generation_kwargs(tokenizer, settings: GenerationArguments, sample: bool | None = None) -> dict:
    """`generate` arguments stopping at the end-of-turn token, independent of the model's own generation defaults.

    `sample` overrides `settings.do_sample` (evaluation decodes both ways).
    """
    kwargs = {
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "num_beams": 1,
        "repetition_penalty": settings.repetition_penalty,
        "no_repeat_ngram_size": settings.no_repeat_ngram_size,
    }
    if settings.do_sample if sample is None else sample:
        # top_k=0 switches off transformers' default top-k of 50 (pure nucleus sampling, as in the LCCC paper).
        kwargs.update(do_sample=True, top_p=settings.top_p, temperature=settings.temperature, top_k=settings.top_k)
    else:
        kwargs["do_sample"] = False
    return kwargs


# --- The settings a run is evaluated and served with, saved next to it. ------------------------------------------

GENERATION_CONFIG = "generation_config.json"  # transformers' format: vLLM and TGI read it from a model folder too
SAVED_SETTINGS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "no_repeat_ngram_size",
)


def save_generation_config(folder, settings: GenerationArguments, tokenizer) -> Path:
    """Write `settings` as the folder's `generation_config.json` (atomically), with the end-of-turn token."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        **{name: getattr(settings, name) for name in SAVED_SETTINGS},
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    path = Path(folder) / GENERATION_CONFIG
    partial = path.with_suffix(".json.tmp")
    partial.write_text(config.to_json_string(), encoding="utf-8")
    os.replace(partial, path)
    return path


def load_generation_defaults(model_path, overrides: dict | None = None) -> GenerationArguments:
    """The generation settings saved with a run (its `generation_config.json`), `overrides` on top.

    Settings the file leaves out keep `GenerationArguments`' defaults; a folder without the file gets them all; a
    checkpoint inside a run gets the run's. Eval, chat and the server all start from here, so what was evaluated is
    what is served.
    """
    from transformers import GenerationConfig

    saved = {}
    path = Path(model_path) / GENERATION_CONFIG
    if not path.is_file() and Path(model_path).name.startswith("checkpoint-"):
        path = Path(model_path).parent / GENERATION_CONFIG
    if path.is_file():
        try:
            config = GenerationConfig.from_pretrained(str(path.parent))
        except (OSError, ValueError) as err:
            raise UserError(f"{path} is not a readable generation config: {str(err).splitlines()[0]}") from None
        saved = {name: getattr(config, name) for name in SAVED_SETTINGS if getattr(config, name, None) is not None}
    return GenerationArguments(**{**saved, **(overrides or {})})


def chosen_settings(settings: GenerationArguments, chosen: list[str]) -> dict:
    """The generation settings a user gave on the command line or in a recipe (`Parsed.chosen`)."""
    return {name: getattr(settings, name) for name in chosen if name in GenerationArguments.__dataclass_fields__}
