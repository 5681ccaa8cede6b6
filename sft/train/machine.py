"""The machine a run starts on: the facts every launch decision reads, and what the run used (peak memory).

Decisions (sft/train/plan.py) read only a `Facts`, so a test on a CPU states a T4, an H100 or an FSDP launch and drives
the same code a GPU run drives.
"""

import os
import resource
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType
from transformers.utils import is_flash_attn_2_available

from sft.common.model import NATIVE_BF16_CAPABILITY

HALF_PRECISION = ("bfloat16", "float16")  # the dtypes FlashAttention-2 accepts
# The attention for rows packed padding-free where FlashAttention-2 cannot run, by device: the decision rule as data,
# for the GPU benchmark's figures to switch (docs/gpus-and-speed.md, "Attention and packing"). SDPA computes the
# whole flattened micro-batch (batch x length tokens); flex_attention only each sequence's own blocks, but it has no
# backward on CPU (torch/nn/attention/flex_attention.py, _validate_device) and no GPU figures exist yet. Set "cuda"
# to "flex_attention" once a `make bench-gpu` flex row beats the sdpa row at the same length.
PACKED_ATTENTION_WITHOUT_FA2 = {"cuda": "sdpa", "cpu": "sdpa"}


@dataclass(frozen=True)
class Facts:
    """What the launch decisions depend on, all known before any weight is loaded."""

    cuda: bool  # this process trains on a CUDA GPU
    capability: tuple[int, int] | None  # compute capability of this process's GPU
    flash_attn_2: bool  # flash-attn installed and importable
    distributed_type: DistributedType  # as the Accelerator will see it, not as PartialState sees it at load time
    num_processes: int
    local_rank: int  # the index of this process's GPU among those it sees (see gpu_of_this_process)
    fsdp_activation_checkpointing: bool  # FSDP's own activation checkpointing is on (accelerate config)
    gpu_name: str | None = None  # as torch.cuda.get_device_name reports it
    memory_gb: float | None = None  # the GPU's total memory
    peak_flops: float | None = None  # dense tensor-core peak in the run's precision (None: unknown)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def distributed_type_at_load(training_args=None) -> DistributedType:
    """FSDP and ZeRO as the launcher sets them up: PartialState says MULTI_GPU under FSDP until an Accelerator exists.

    `accelerate launch` exports ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED; the training arguments `fsdp` and
    `deepspeed` turn them on without a launcher config.
    """
    if env_flag("ACCELERATE_USE_DEEPSPEED") or getattr(training_args, "deepspeed", None):
        return DistributedType.DEEPSPEED
    if env_flag("ACCELERATE_USE_FSDP") or getattr(training_args, "fsdp", None):
        return DistributedType.FSDP
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        on_cpu = getattr(training_args, "use_cpu", False) or not torch.cuda.is_available()
        return DistributedType.MULTI_CPU if on_cpu else DistributedType.MULTI_GPU
    return DistributedType.NO


def gpu_of_this_process() -> int:
    """LOCAL_RANK modulo the GPUs this process sees, as the Accelerator picks its device (accelerate/state.py,
    `set_device`): a scheduler that shows each rank one GPU (CUDA_VISIBLE_DEVICES per rank) gives rank 1 cuda:0."""
    return int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()


def machine_facts(training_args=None) -> Facts:
    """The facts of this process, read from torch, the installed packages, the launcher's environment and the
    training arguments (`use_cpu`, `fsdp`, `deepspeed`) when given."""
    cuda = torch.cuda.is_available() and not getattr(training_args, "use_cpu", False)
    local_rank = gpu_of_this_process() if cuda else 0
    fsdp_config = getattr(training_args, "fsdp_config", None) or {}
    gpu = torch.cuda.get_device_properties(local_rank) if cuda else None
    return Facts(
        cuda=cuda,
        capability=torch.cuda.get_device_capability(local_rank) if cuda else None,
        flash_attn_2=is_flash_attn_2_available(),
        distributed_type=distributed_type_at_load(training_args),
        num_processes=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=local_rank,
        fsdp_activation_checkpointing=env_flag("FSDP_ACTIVATION_CHECKPOINTING")
        or bool(fsdp_config.get("activation_checkpointing")),
        gpu_name=gpu.name if gpu else None,
        memory_gb=round(gpu.total_memory / 1e9, 1) if gpu else None,
        peak_flops=tabled_peak_flops(gpu.name, (gpu.major, gpu.minor)) if gpu else None,
    )


def tabled_peak_flops(device_name: str, capability: tuple[int, int]) -> float | None:
    """The GPU's dense peak in the precision the launcher uses on it (bf16 on 8.0+, else fp16), from TRL's table."""
    from trl.trainer.utils import get_peak_flops

    return get_peak_flops(device_name, "bfloat16" if capability >= (8, 0) else "float16")


def has_native_bf16(facts: Facts) -> bool:
    """Ampere (8.0) and newer compute in bf16; `torch.cuda.is_bf16_supported()` also counts slow emulation."""
    return facts.cuda and facts.capability >= NATIVE_BF16_CAPABILITY


def attention_for(facts: Facts, dtype: str | None, packed: bool = False) -> str:
    """FlashAttention-2 where installed on an Ampere-or-newer GPU and the weights are bf16/fp16; else for packed rows
    what PACKED_ATTENTION_WITHOUT_FA2 says, and SDPA for padded ones."""
    if has_native_bf16(facts) and facts.flash_attn_2 and dtype in HALF_PRECISION:
        return "flash_attention_2"
    if packed:
        return PACKED_ATTENTION_WITHOUT_FA2["cuda" if facts.cuda else "cpu"]
    return "sdpa"


def paged_optimizer_bytes() -> int:
    """What bitsandbytes' paged optimizers hold in CUDA managed memory, which torch's allocator does not count."""
    from bitsandbytes.functional import GlobalPageManager

    return sum(t.numel() * t.element_size() for t in GlobalPageManager.get_instance().paged_tensors)


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process in bytes: on a GPU, torch's allocated and reserved peaks plus the paged
    optimizer states beside them; else the process's peak resident memory."""
    if device.type == "cuda":
        return {
            "allocated": torch.cuda.max_memory_allocated(device),
            "reserved": torch.cuda.max_memory_reserved(device),
            "paged_optimizer": paged_optimizer_bytes(),
            "kind": "cuda",
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"allocated": rss, "reserved": rss, "paged_optimizer": 0, "kind": "process_max_rss"}
