"""The base model and tokenizer: where they come from and how they are loaded (4-bit NF4 + LoRA via TRL)."""

import dataclasses
import logging
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from transformers import AutoTokenizer
from transformers.utils import is_flash_attn_2_available
from trl import ModelConfig, SFTConfig, get_quantization_config

from sft.errors import UserError
from sft.template import training_chat_template

logger = logging.getLogger(__name__)
TINY_MODEL_DIR = "build/tiny-llama"  # where `make tiny-model` builds the smoke model
# Attention backends that keep the sequences of a padding-free pack apart (via position_ids / cu_seq_lens).
PACKING_SAFE_ATTENTION = {"flash_attention_2", "flash_attention_3", "flex_attention", "sdpa", "eager"}
PACKING_SAFE_STRATEGIES = {"bfd", "bfd_split"}


def check_model_source(name: str | None) -> None:
    """A model is a local folder or a Hub id (`org/name`); anything else is a typo worth stopping for."""
    if not name:
        raise UserError("no model given: set `model_name_or_path` in the recipe")
    path = Path(name)
    if path.is_dir():
        return
    meant_local = name.startswith((".", "/", "~")) or path.exists() or Path(path.parts[0]).is_dir()
    if name == TINY_MODEL_DIR:
        raise UserError(f"the smoke model {name} is not built yet: run `make tiny-model` (or `make sft`)")
    if meant_local or name.count("/") != 1:
        raise UserError(f"model {name!r} is neither a local folder nor a Hub id like `org/name`")


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
    """A model's or run's tokenizer, with a chat template whose assistant replies carry `{% generation %}` markers.

    Training needs the markers (loss on the replies only); generating does not, so with `need_reply_markers` off a
    template TRL cannot mark stays as it is. The pad token falls back to the end-of-sequence token, as in TRL.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UserError(hub_error_message(name, err)) from None
    try:
        tokenizer.chat_template = training_chat_template(tokenizer, chat_template_path)
    except UserError:
        if need_reply_markers or not tokenizer.chat_template:
            raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(requested: str | None) -> str:
    """The recipe's choice, else FlashAttention-2 where installed on an Ampere-or-newer GPU, else SDPA."""
    if requested:
        return requested
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8 and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def shards_weights() -> bool:
    """FSDP and DeepSpeed ZeRO split the weights across processes: they place the model themselves."""
    return PartialState().distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def model_init_kwargs(model_args: ModelConfig, training_args: SFTConfig) -> dict:
    """`from_pretrained` arguments for SFTTrainer, recipe's `model_init_kwargs` winning.

    Placement follows TRL: the whole model on the one GPU of a single process, no device map under DDP (the
    trainer puts one full copy on each process's GPU) nor under FSDP/ZeRO-3, which shard it themselves.
    """
    if training_args.trust_remote_code:
        logger.warning("trust_remote_code is ON: code from the model repository will run on this machine")
    kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": attention_implementation(model_args.attn_implementation),
        "dtype": model_args.dtype,
    }
    if shards_weights():
        kwargs["device_map"] = None
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def quantization_config(model_args: ModelConfig):
    """TRL's BitsAndBytesConfig; FSDP/ZeRO-3 shard 4-bit weights only when stored in the compute dtype."""
    if model_args.load_in_4bit and shards_weights() and model_args.bnb_4bit_quant_storage is None:
        model_args = dataclasses.replace(model_args, bnb_4bit_quant_storage=model_args.dtype)
    return get_quantization_config(model_args)


def keep_packed_sequences_apart(training_args: SFTConfig, attention: str) -> None:
    """Allow packing only where packed sequences cannot attend to each other; else group by length instead."""
    if not training_args.packing:
        return
    problem = None
    if training_args.packing_strategy not in PACKING_SAFE_STRATEGIES:
        problem = f"packing_strategy {training_args.packing_strategy!r} cuts and joins sequences"
    elif attention not in PACKING_SAFE_ATTENTION:
        problem = f"attention {attention!r} is not known to keep packed sequences apart"
    if problem:
        logger.warning("packing refused: %s; grouping samples by length instead", problem)
        training_args.packing = False
        training_args.padding_free = False
        training_args.train_sampling_strategy = "group_by_length"
