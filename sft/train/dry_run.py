"""`--dry_run true`: the plan of a run, keyed by recipe key names, before any GPU hour is spent.

Resolves what the launch decides (plan.py), then measures the prepared data with the model's tokenizer: samples,
steps and supervised tokens per epoch, and an estimate of peak GPU memory per process from the model's config.
Loads no weights and writes nothing: data not prepared yet is prepared into a temporary folder, then deleted.
"""

import dataclasses
import logging
import math
import os
import tempfile

import numpy as np
import torch
from datasets import DatasetDict
from transformers import AutoConfig, AutoModelForCausalLM

from sft.common.config import CHECKPOINTING, Recipe
from sft.common.errors import UserError
from sft.common.model import load_tokenizer
from sft.data import load_conversations
from sft.data.cache import is_prepared
from sft.data.pipeline import subset
from sft.data.stats import token_counts
from sft.train.gpus import ESTIMATE_ANCHOR, attended_length, flops_per_token, gpu_facts, named_gpu, published_mfu
from sft.train.machine import Facts, machine_facts
from sft.train.plan import PACKING_SAFE_STRATEGIES, SHARDING, decide

logger = logging.getLogger(__name__)
MEASURED_SAMPLES = 2000  # samples tokenized to estimate the epoch's tokens (all of them when fewer)
# An estimate this many times the machine's memory cannot fit by any error of the estimate: refused, not warned.
HOPELESS_MEMORY_FACTOR = 10
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, None: 4, "auto": 2}


def prepared_data(recipe: Recipe, scratch: str) -> DatasetDict:
    """The prepared splits: from the cache when it holds them, else prepared into the folder `scratch`."""
    args, seed = recipe.data, recipe.training.seed
    if is_prepared(args, seed):
        return load_conversations(args, seed)
    return load_conversations(dataclasses.replace(args, processed_dir=scratch), seed)


def epoch_figures(recipe: Recipe, datasets: DatasetDict, tokenizer, num_processes: int) -> dict:
    """Samples, optimizer steps and supervised tokens of one epoch, from a tokenized sample of the train split."""
    training, train = recipe.training, datasets["train"]
    measured = train.select(subset(len(train), MEASURED_SAMPLES, training.seed))
    counts = np.array([token_counts(sample, tokenizer)[:2] for sample in measured]).reshape(-1, 2)
    tokens, supervised = counts[:, 0], counts[:, 1]
    limit = training.max_length or int(tokens.max(initial=1))
    kept = np.minimum(tokens, limit)
    scale = len(train) / max(len(measured), 1)
    per_step_rows = training.per_device_train_batch_size * training.gradient_accumulation_steps * num_processes
    rows = math.ceil(kept.sum() * scale / limit) if training.packing else len(train)
    steps = math.ceil(rows / per_step_rows)
    slots = attention_rows(kept, training.per_device_train_batch_size, limit, training.packing, training.seed)
    return {
        "train_samples": len(train),
        "validation_samples": len(datasets.get("validation", [])),
        "effective_batch": per_step_rows,
        "effective_batch_unit": "packed rows of max_length tokens" if training.packing else "samples",
        "steps_per_epoch": steps,
        "steps": training.max_steps if training.max_steps > 0 else math.ceil(steps * training.num_train_epochs),
        "tokens_per_epoch": int(kept.sum() * scale),
        # a truncated sample keeps its share of supervised tokens (truncation is rare: see `make data`)
        "supervised_tokens_per_epoch": int((supervised * kept / np.maximum(tokens, 1)).sum() * scale),
        # the token slots the model computes, padding included, and the length attention is paid over (gpus.py)
        "computed_tokens_per_epoch": int(sum(slots) * scale),
        "attended_length": round(attended_length(kept.tolist(), slots, recipe.model.attn_implementation)),
        "measured_samples": len(measured),
    }


def attention_rows(kept: np.ndarray, batch: int, limit: int, packing: bool, seed: int) -> list[int]:
    """The token slots of each attention call in an epoch of these samples: padding-free packing flattens a
    micro-batch of `batch` full rows into one sequence; else each sample is a row padded to its micro-batch's
    longest (shuffled as the Trainer's sampler does; group_by_length would pad less)."""
    if packing:
        return [batch * limit] * math.ceil(kept.sum() / (batch * limit))
    shuffled, rows = np.random.default_rng(seed).permutation(kept), []
    for start in range(0, len(shuffled), batch):
        micro_batch = shuffled[start : start + batch]
        rows += [int(micro_batch.max())] * len(micro_batch)
    return rows


def model_config(recipe: Recipe):
    """The model's config, or None when it is not at hand (then there is no memory or time estimate)."""
    try:
        return AutoConfig.from_pretrained(
            recipe.model.model_name_or_path,
            revision=recipe.model.model_revision,
            trust_remote_code=recipe.training.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        logger.info("no memory or time estimate: the model's config is not at hand (%s)", str(err).splitlines()[0])
        return None


def memory_estimate_gb(recipe: Recipe, facts: Facts, config) -> dict:
    """Peak GPU memory per process, estimated from the model's config."""
    model_args, training = recipe.model, recipe.training
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    linear = [m for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
    quantized = sum(m.weight.numel() for m in linear)
    other = sum(p.numel() for p in skeleton.parameters()) - quantized
    half = BYTES.get(model_args.dtype, 2)
    # NF4: 4 bits per weight plus one absmax per 64 weights (fp32, or 8-bit with nested quantization)
    weight_bits = (4 + (8.127 if model_args.use_bnb_nested_quant else 32) / 64) if model_args.load_in_4bit else 8 * half
    # FSDP/ZeRO-3 shard weights, LoRA weights and optimizer states; but transformers 5 loads a 4-bit model whole on
    # every rank first (ZeRO-3's zero.Init and FSDP's rank-0 loading skip quantized models), so that is a floor
    shards = facts.num_processes if facts.distributed_type in SHARDING else 1
    whole = quantized * weight_bits / 8 + other * half
    lora = sum(model_args.lora_r * (m.in_features + m.out_features) for m in linear) if model_args.use_peft else 0
    lora_bytes = (
        lora * (4 if training.fp16 else 2) / shards
    )  # TRL: LoRA in bf16; fp32 under fp16 (sft/train/trainer.py)
    optimizer = lora * (8 if "8bit" not in training.optim else 2) / shards  # Adam's two states, 32-bit unless 8-bit
    rows, length = training.per_device_train_batch_size, training.max_length or 1024
    hidden, layers = config.hidden_size, config.num_hidden_layers
    # 16-bit activations of one layer: ~34 x tokens x hidden bytes (Korthikanti et al. 2022, memory-efficient
    # attention); checkpointing keeps only each layer's input and recomputes one layer at a time
    per_layer = 34 * rows * length * hidden
    kept = layers * 2 * rows * length * hidden + per_layer if getattr(training, CHECKPOINTING) else layers * per_layer
    logits = 2 * rows * length * config.vocab_size * 4  # fp32 logits and their gradient
    gb = {
        "weights": whole / shards,
        "lora_weights_and_gradients": 2 * lora_bytes,
        "optimizer_states": optimizer,
        "activations": kept,
        "logits": logits,
    }
    gb = {key: round(value / 1e9, 2) for key, value in gb.items()}
    training_peak, load_peak = sum(gb.values()) + 0.5, whole / 1e9 + 0.5
    return {
        "total": round(max(training_peak, load_peak), 1),
        "while_loading": round(load_peak, 1),  # the whole 4-bit model on this process
        "cuda_context_and_workspace": 0.5,
        **gb,
    }


def shape_of(config) -> dict:
    """The sizes the FLOPs formula reads, from a model's config."""
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    shape = {key: getattr(config, key) for key in keys}
    shape["num_key_value_heads"] = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return shape


def fit_on_gpu(facts: Facts, memory: dict) -> dict:
    """Whether the estimated peak fits the GPU's memory, and by what margin."""
    margin = round(facts.memory_gb - memory["total"], 1)
    return {"gpu": facts.gpu_name, "memory_gb": facts.memory_gb, "fits": margin >= 0, "margin_gb": margin}


def epoch_time_estimate(recipe: Recipe, facts: Facts, config, epoch: dict) -> dict:
    """Hours per epoch at the MFU a published figure implies (ESTIMATE_ANCHOR) on this GPU's peak."""
    lora_r = recipe.model.lora_r if recipe.model.use_peft else 0
    flops = flops_per_token(shape_of(config), lora_r, epoch["attended_length"])
    mfu = published_mfu(ESTIMATE_ANCHOR)
    tokens_per_s = mfu * facts.peak_flops / flops  # per GPU
    seconds = epoch["computed_tokens_per_epoch"] / (tokens_per_s * facts.num_processes)
    return {
        "hours_per_epoch": round(seconds / 3600, 2),
        "tokens_per_s_per_gpu": round(tokens_per_s),
        "supervised_tokens_per_s": round(epoch["supervised_tokens_per_epoch"] / seconds),
        "model_flops_per_token": round(flops),
        "peak_tflops": facts.peak_flops / 1e12,
        "mfu": round(mfu, 3),
        "mfu_source": f"implied by {ESTIMATE_ANCHOR.name}, {ESTIMATE_ANCHOR.tokens_per_s:,} tokens/s "
        "(published; no GPU figures of our own yet)",
    }


def planned_facts(recipe: Recipe) -> Facts:
    """This machine's facts, or a named GPU's (`--gpu A100`) with this launch's processes."""
    facts = machine_facts(recipe.training)
    if recipe.run.gpu:
        return gpu_facts(named_gpu(recipe.run.gpu), dataclasses.replace(facts, local_rank=0))
    return facts


def memory_available_gb(facts: Facts) -> float:
    """The memory one process trains in: its GPU's (a named GPU's with --gpu), or the machine's RAM on a CPU."""
    if facts.memory_gb:
        return facts.memory_gb
    if facts.cuda:
        return torch.cuda.get_device_properties(facts.local_rank).total_memory / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def check_planned_memory(recipe: Recipe) -> None:
    """Warn when the memory estimate exceeds the memory of this machine (or of the GPU named by --gpu); refuse when
    it does so hopelessly (a max_length of 10^9), before any data is prepared or weight loaded."""
    config = model_config(recipe)
    if config is None:
        return
    facts = planned_facts(recipe)
    estimate = memory_estimate_gb(recipe, facts, config)
    available = memory_available_gb(facts)
    if estimate["total"] <= available:
        return
    training = recipe.training
    message = (
        f"the plan needs about {estimate['total']:,} GB per process ({estimate['activations']:,} GB of activations "
        f"and {estimate['logits']:,} GB of logits at max_length {training.max_length} x batch "
        f"{training.per_device_train_batch_size}) and this {'GPU' if facts.cuda else 'machine'} has "
        f"{available:,.0f} GB: lower max_length or per_device_train_batch_size"
    )
    if estimate["total"] > HOPELESS_MEMORY_FACTOR * available:
        raise UserError(message)
    logger.warning(message)


def dry_run(recipe: Recipe, facts: Facts | None = None) -> dict:
    """The plan: the values the run will use, keyed by recipe key names, what changed and why, and the epoch.

    `facts` defaults to this machine's, or the GPU named by `--gpu`; a test states another machine's instead.
    """
    training, model = recipe.training, recipe.model
    facts = facts or planned_facts(recipe)
    changes = decide(recipe, facts)
    tokenizer = load_tokenizer(
        model.model_name_or_path,
        revision=model.model_revision,
        trust_remote_code=training.trust_remote_code,
        chat_template_path=training.chat_template_path,
    )
    kwargs = training.model_init_kwargs or {}
    packs_bfd = training.packing and training.packing_strategy in PACKING_SAFE_STRATEGIES
    with tempfile.TemporaryDirectory(prefix="dry-run-") as scratch:
        epoch = epoch_figures(recipe, prepared_data(recipe, scratch), tokenizer, facts.num_processes)
    config = model_config(recipe)
    memory = memory_estimate_gb(recipe, facts, config) if config else None
    estimate = epoch_time_estimate(recipe, facts, config, epoch) if config and facts.peak_flops else None
    return {
        "bf16": training.bf16,
        "fp16": training.fp16,
        "dtype": model.dtype,
        "attn_implementation": model.attn_implementation,
        "device_map": kwargs.get("device_map"),
        "load_in_4bit": model.load_in_4bit,
        "bnb_4bit_quant_storage": model.bnb_4bit_quant_storage or "uint8",
        "distributed_type": facts.distributed_type.value,
        "num_processes": facts.num_processes,
        "activation_checkpointing": getattr(training, CHECKPOINTING),
        "ddp_find_unused_parameters": training.ddp_find_unused_parameters,
        "packing": training.packing,
        # TRL turns padding-free on by itself for packing with bfd/bfd_split
        "padding_free": training.padding_free or packs_bfd,
        "train_sampling_strategy": training.train_sampling_strategy,
        **epoch,
        "peak_gpu_memory_estimate_gb": memory,
        "gpu_memory_fit": fit_on_gpu(facts, memory) if memory and facts.memory_gb else None,
        "epoch_time_estimate": estimate,
        "changed": {c.key: {"recipe": c.was, "now": c.now, "why": c.why} for c in changes},
    }
