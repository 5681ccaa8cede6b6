"""What a run decides before loading anything: precision, attention, placement, distributed and packing settings.

`decide` applies every rule to the parsed recipe, in place, and returns what it changed and why; the run and
`--dry_run true` call it alike. Each rule reads the recipe and the machine's `Facts` (sft/train/machine.py) only.
"""

import logging
import os
from dataclasses import dataclass
from typing import Any

from accelerate.utils import DistributedType

from sft.common.config import CHECKPOINTING, Recipe
from sft.common.errors import UserError
from sft.train.machine import HALF_PRECISION, Facts, attention_for, has_native_bf16

logger = logging.getLogger(__name__)
SHARDING = (DistributedType.FSDP, DistributedType.DEEPSPEED)
DATA_PARALLEL = (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
# Attention backends that keep the sequences of a padding-free pack apart (via position_ids / cu_seq_lens).
PACKING_SAFE_ATTENTION = {"flash_attention_2", "flash_attention_3", "flex_attention", "sdpa", "eager"}
PACKING_SAFE_STRATEGIES = {"bfd", "bfd_split"}


@dataclass
class Change:
    """A recipe value the launcher set differently, with the reason."""

    key: str
    was: Any
    now: Any
    why: str


def _set(changes: list[Change], part, key: str, value, why: str) -> None:
    if getattr(part, key) != value:
        changes.append(Change(key, getattr(part, key), value, why))
        setattr(part, key, value)


def fsdp_needs_gpus(recipe: Recipe, facts: Facts, changes: list[Change]) -> None:
    """accelerate turns a launch into FSDP only on GPUs (accelerate/state.py, AcceleratorState: the FSDP switch sits in
    the branch for MULTI_GPU-like types); on CPUs the launch stays MULTI_CPU and would train as plain DDP."""
    if facts.distributed_type == DistributedType.FSDP and not facts.cuda:
        raise UserError(
            "FSDP needs GPUs: on CPUs accelerate trains an FSDP launch as plain data parallel; use "
            "accelerate_configs/cpu_2proc.yaml here, or plan for a GPU with --gpu NAME (make plan GPU=NAME)"
        )


def choose_precision(recipe: Recipe, facts: Facts, changes: list[Change]) -> None:
    """bf16 on Ampere and newer; on older GPUs (T4, V100) fp16 compute instead of bf16 emulated at a crawl."""
    training, model = recipe.training, recipe.model
    if not facts.cuda or has_native_bf16(facts) or not (training.bf16 or model.dtype == "bfloat16"):
        return
    why = f"compute capability {facts.capability[0]}.{facts.capability[1]} has no native bf16 (needs 8.0+): fp16"
    _set(changes, training, "bf16", False, why)
    _set(changes, training, "fp16", True, why)
    training.mixed_precision = "fp16"  # what the Trainer hands the Accelerator, derived in SFTConfig.__post_init__
    _set(changes, model, "dtype", "float16", why)


def choose_attention(recipe: Recipe, facts: Facts, changes: list[Change]) -> None:
    """The recipe's attention if it can run, else FlashAttention-2 where it can, else SDPA."""
    model = recipe.model
    if model.attn_implementation is None:
        packed = getattr(recipe.training, "packing", False)  # a preference run's DPOConfig has no packing
        attention = attention_for(facts, model.dtype, packed=packed)
        _set(changes, model, "attn_implementation", attention, "not set: the fastest here")
    elif model.attn_implementation.startswith("flash_attention") and model.dtype not in HALF_PRECISION:
        raise UserError(f"{model.attn_implementation} runs only in bfloat16/float16, but dtype is {model.dtype}")


def choose_placement(recipe: Recipe, facts: Facts, changes: list[Change]) -> None:
    """Where the weights go: FSDP/ZeRO place them themselves, else the whole model on this process's own GPU."""
    kwargs = recipe.training.model_init_kwargs or {}
    if "device_map" in kwargs:
        return
    if facts.distributed_type in SHARDING:
        device_map, why = None, f"{facts.distributed_type.value} shards and places the weights itself"
    elif facts.cuda:  # under DDP TRL passes None, which the 4-bit loader resolves to this same GPU
        device_map = {"": facts.local_rank}
        why = "the whole model on this process's GPU (device_map='auto' would spread it over every visible GPU)"
    else:
        return
    changes.append(Change("device_map", kwargs.get("device_map", "TRL's default: 'auto'"), device_map, why))
    recipe.training.model_init_kwargs = {**kwargs, "device_map": device_map}
    if facts.distributed_type == DistributedType.NO:
        one_process_one_gpu(recipe.training, changes)


def one_process_one_gpu(training, changes: list[Change]) -> None:
    """A single process sees every GPU of the machine: the Trainer would wrap the model in DataParallel (which
    SFTTrainer refuses) unless the model is split; it trains on one, as the Trainer itself sets for a split model."""
    training.device  # noqa: B018 - the Trainer's device setup, run now: run later it would reset the count set below
    gpus = training.n_gpu
    if gpus > 1:
        why = f"{gpus} GPUs visible to one process: it trains on cuda:0 only, not DataParallel (SFTTrainer refuses it)"
        changes.append(Change("n_gpu", gpus, 1, why))
        training._n_gpu = 1  # as Trainer does for a model placed with device_map (trainer.py, is_model_parallel)


def choose_quant_storage(recipe: Recipe, facts: Facts, changes: list[Change]) -> None:
    """FSDP and ZeRO-3 shard only tensors of one float dtype: the 4-bit weights are stored in the compute dtype."""
    model = recipe.model
    if model.load_in_4bit and facts.distributed_type in SHARDING and model.bnb_4bit_quant_storage is None:
        why = f"{facts.distributed_type.value} flattens tensors of one dtype: 4-bit storage in the compute dtype"
        _set(changes, model, "bnb_4bit_quant_storage", model.dtype, why)


def choose_distributed_settings(recipe: Recipe, facts: Facts, changes: list[Change]) -> None:
    """No unused-parameter search for LoRA under DDP; FSDP's own activation checkpointing under FSDP."""
    training = recipe.training
    data_parallel = facts.distributed_type in DATA_PARALLEL
    if data_parallel and recipe.model.use_peft and training.ddp_find_unused_parameters is None:
        why = "every LoRA weight gets a gradient each step; the Trainer keeps the search on for a PeftModel"
        _set(changes, training, "ddp_find_unused_parameters", False, why)
    if facts.distributed_type == DistributedType.FSDP and getattr(training, CHECKPOINTING, False):
        why = "under FSDP, FSDP's own checkpointing (no second all-gather in the backward pass)"
        if not facts.fsdp_activation_checkpointing:
            changes.append(Change("fsdp_activation_checkpointing", False, True, why))
            os.environ["FSDP_ACTIVATION_CHECKPOINTING"] = "true"  # read by the Accelerator's FSDP plugin
        _set(changes, training, CHECKPOINTING, False, why)
        training.gradient_checkpointing = False  # the older name mirrors the newer one where both exist


def keep_packed_sequences_apart(recipe: Recipe, facts: Facts, changes: list[Change]) -> None:
    """Allow packing only where packed sequences cannot attend to each other; else group by length instead."""
    training, attention = recipe.training, recipe.model.attn_implementation
    if not getattr(training, "packing", False):  # DPOConfig has no packing
        return
    problem = None
    if training.packing_strategy not in PACKING_SAFE_STRATEGIES:
        problem = f"packing_strategy {training.packing_strategy!r} cuts and joins sequences"
    elif attention not in PACKING_SAFE_ATTENTION:
        problem = f"attention {attention!r} is not known to keep packed sequences apart"
    if problem:
        why = f"packing refused: {problem}; grouping samples by length instead"
        logger.warning(why)
        _set(changes, training, "packing", False, why)
        _set(changes, training, "padding_free", False, why)
        _set(changes, training, "train_sampling_strategy", "group_by_length", why)


def let_the_watch_see_bad_losses(recipe: Recipe, facts: Facts, changes: list[Change]) -> None:
    """transformers logs a NaN or infinite step loss as the average of the earlier ones (`logging_nan_inf_filter`),
    which would hide it from the watch that stops a broken run (sft/train/watchdog.py), unless the recipe sets it."""
    if recipe.run.stop_after_bad_steps and "logging_nan_inf_filter" not in recipe.resolved:
        why = "the loss is logged as it is, so that a NaN or infinite loss stops the run (stop_after_bad_steps)"
        _set(changes, recipe.training, "logging_nan_inf_filter", False, why)


RULES = (
    fsdp_needs_gpus,
    choose_precision,
    choose_attention,
    choose_placement,
    choose_quant_storage,
    choose_distributed_settings,
    keep_packed_sequences_apart,
    let_the_watch_see_bad_losses,
)


def decide(recipe: Recipe, facts: Facts) -> list[Change]:
    """Apply every rule to the recipe in place; return what changed and why, also logged."""
    changes: list[Change] = []
    for rule in RULES:
        rule(recipe, facts, changes)
    for change in changes:
        logger.info("%s: %r -> %r (%s)", change.key, change.was, change.now, change.why)
    return changes
