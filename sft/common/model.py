"""The base model and tokenizer: where they come from and how they are loaded (4-bit NF4 + LoRA via TRL)."""

import logging
from pathlib import Path

from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from transformers import AutoTokenizer
from trl import ModelConfig, SFTConfig
from trl.chat_template_utils import has_generation_markers

from sft.common.errors import UserError
from sft.common.template import training_chat_template

logger = logging.getLogger(__name__)
# where `make tiny-model` builds the smoke models, by family (`python -m sft.tiny --family ...`)
# Compute capability from which a GPU computes in bf16 natively (Ampere); below it (T4, V100) bf16 is only emulated,
# slowly, so training, merging, evaluation and chat use fp16 there.
NATIVE_BF16_CAPABILITY = (8, 0)
TINY_MODEL_DIRS = {
    "llama": "build/tiny-llama",
    "qwen2_5": "build/tiny-qwen2_5",
    "llama3": "build/tiny-llama3",
    "qwen3": "build/tiny-qwen3",
    "qwen3_2507": "build/tiny-qwen3_2507",
    "glm4": "build/tiny-glm4",
    "r1_distill": "build/tiny-r1_distill",
}


def check_model_source(name: str | None) -> None:
    """A model is a local folder or a Hub id (`org/name`); anything else is a typo worth stopping for."""
    if not name:
        raise UserError("no model given: set `model_name_or_path` in the recipe")
    path = Path(name)
    if path.is_dir():
        check_model_folder(path)
        return
    meant_local = name.startswith((".", "/", "~")) or path.exists() or Path(path.parts[0]).is_dir()
    if name in TINY_MODEL_DIRS.values():
        raise UserError(f"the smoke model {name} is not built yet: run `make tiny-model` (or `make sft`)")
    if meant_local or name.count("/") != 1:
        raise UserError(f"model {name!r} is neither a local folder nor a Hub id like `org/name`")


def check_model_folder(path: Path) -> None:
    """A local base model holds `config.json`; an empty folder or a training run's adapter is named as such."""
    if (path / "config.json").is_file():
        return
    if (path / "adapter_config.json").is_file():
        raise UserError(
            f"{path} is a training run (a LoRA adapter), not a base model: give the base it was trained from (its "
            "adapter_config.json names it), or merge the run first with `lccc-sft merge`"
        )
    raise UserError(f"{path} holds no model (no config.json): give a model folder or a Hub id like `org/name`")


def hub_error_message(name: str, err: OSError) -> str:
    """What to do when a model cannot be fetched: gated, missing, or no connection."""
    cause = err.__cause__ or err
    if isinstance(cause, GatedRepoError):
        return (
            f"{name} is a gated model: accept its licence at https://huggingface.co/{name}, then log in with "
            "`huggingface-cli login` (or set HF_TOKEN) with an account that has access"
        )
    if isinstance(cause, RepositoryNotFoundError):
        return f"model {name} was not found on the Hub (if it is private, log in with `huggingface-cli login`)"
    return f"could not load {name}: {str(err).splitlines()[0]}"


def load_tokenizer(
    name: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    chat_template_path: str | None = None,
    need_reply_markers: bool = True,
):
    """A model's or run's tokenizer, with a chat template whose assistant replies carry `{% generation %}` markers
    where we or TRL have a training form of it or one can be derived from it (`derive_training_template`); any other
    template stays as it is, and its reply spans are derived per conversation (`derived_reply_mask`). The pad token
    falls back to the end-of-sequence token, as in TRL.
    The model's own template stays at hand as `official_chat_template`, for the label audit to compare against.
    With `need_reply_markers` off (generating), a `chat_template_path` that is not a file is ignored.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UserError(hub_error_message(name, err)) from None
    official = tokenizer.chat_template
    tokenizer.official_chat_template = official.get("default") if isinstance(official, dict) else official
    try:
        tokenizer.chat_template = training_chat_template(tokenizer, chat_template_path)
    except UserError:
        if need_reply_markers or not tokenizer.chat_template:
            raise
    if not has_generation_markers(tokenizer.chat_template):  # trained as it is (derived spans): it is the official
        tokenizer.official_chat_template = tokenizer.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_init_kwargs(model_args: ModelConfig, training_args: SFTConfig) -> dict:
    """`from_pretrained` arguments for SFTTrainer, as the launch plan decided them (recipe wins)."""
    if training_args.trust_remote_code:
        logger.warning("trust_remote_code is ON: code from the model repository will run on this machine")
    kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def keep_4bit_layers_differentiable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel during evaluation.

    On a CPU with AVX512-BF16, a `Linear4bit` run in eval mode without gradients repacks its weights for
    `gemv_4bit` and keeps them so: training after the first evaluation then goes through a kernel with no
    backward (gradients to earlier layers are silently dropped) and fails outright on layers with a bias (Qwen2).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
