"""The GPUs a run can be planned for from any machine (`lccc-sft plan --gpu A100`), model FLOPs, and the MFU anchor.

A named GPU becomes a `Facts` (sft/train/machine.py), so the plan's decisions (sft/train/plan.py) run exactly as they
would on that GPU. The same FLOPs formula serves the epoch estimate here and the GPU benchmark's MFU
(benchmarks/bench_gpu.py), so the two can be set side by side.
"""

import dataclasses
from dataclasses import dataclass

from accelerate.utils import DistributedType

from sft.common.errors import UserError
from sft.train.machine import Facts, has_native_bf16


@dataclass(frozen=True)
class Gpu:
    """What a plan needs to know of a GPU model."""

    device_name: str  # as torch.cuda.get_device_name reports it
    memory_gb: float  # total memory as nvidia-smi reports it (MiB), in 1e9 bytes
    capability: tuple[int, int]
    peak_flops: float  # dense tensor-core peak in the precision the launcher uses there: bf16, fp16 below 8.0


def mib(value: int) -> float:
    return round(value * 2**20 / 1e9, 1)


# Peaks: TRL's table (trl/trainer/utils.py, _PEAK_FLOPS_BY_DEVICE) where it has the GPU; the 4090 from NVIDIA's Ada
# whitepaper (165.2 TFLOPS dense bf16 with fp32 accumulation). Memory: nvidia-smi's total.
GPUS = {
    "T4": Gpu("Tesla T4", mib(15360), (7, 5), 65e12),
    "L4": Gpu("NVIDIA L4", mib(23034), (8, 9), 121e12),
    "A10": Gpu("NVIDIA A10", mib(23028), (8, 6), 125e12),
    "4090": Gpu("NVIDIA GeForce RTX 4090", mib(24564), (8, 9), 165.2e12),
    "A100-40GB": Gpu("NVIDIA A100-SXM4-40GB", mib(40960), (8, 0), 312e12),
    "A100": Gpu("NVIDIA A100-SXM4-80GB", mib(81920), (8, 0), 312e12),
    "H100": Gpu("NVIDIA H100 80GB HBM3", mib(81559), (9, 0), 989e12),
    "H200": Gpu("NVIDIA H200", mib(143771), (9, 0), 989e12),
}


@dataclass(frozen=True)
class Anchor:
    """A published training speed of a known setting: Llama-2-7B QLoRA, one GPU."""

    name: str
    gpu: str  # a key of GPUS
    tokens_per_s: float
    memory_gb: float


LLAMA2_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
}
# LLaMA-Factory's published comparison (README, "Benchmark"): Llama-2-7B on one A100, batch 4, accumulation 2,
# LoRA r=8, rows of 1024 tokens.
ANCHOR_SETTING = {"length": 1024, "batch_size": 4, "grad_accum": 2, "lora_r": 8}
ANCHORS = [
    Anchor("LLaMA-Factory reference: Hugging Face QLoRA 4-bit (A100, r=8)", "A100", 2415, 9),
    Anchor("LLaMA-Factory reference: unsloth QLoRA 4-bit (A100, r=8)", "A100", 3726, 7),
]
# The MFU an epoch estimate assumes: the Hugging Face row (our stack is Hugging Face's) until our own GPU figures
# (benchmarks/results/speed_gpu.json) replace it here.
ESTIMATE_ANCHOR = ANCHORS[0]


def flops_per_token(shape: dict, lora_r: int, attended_length: float) -> float:
    """Model FLOPs of one trained token: 4 N for the frozen weights of all matrix products (forward and input
    gradient, no weight gradient), 6 N for the LoRA weights on every linear layer, PaLM's 12 x layers x hidden x T
    for attention, T the length whose attention is really computed (`attended_length`)."""
    hidden, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = hidden * shape["num_key_value_heads"] // shape["num_attention_heads"]
    inter = shape["intermediate_size"]
    frozen = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter) + hidden * vocab
    # LoRA on every linear layer of the blocks (q, k, v, o, gate, up, down): r x (in + out) each
    lora = layers * lora_r * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + inter))
    return 4 * frozen + 6 * lora + 12 * layers * hidden * attended_length


# Attention kernels that compute each packed sequence's own blocks only: FlashAttention's variable-length kernel
# (cu_seq_lens) and flex_attention's block mask, which transformers builds from the packed position ids
# (masking_utils.find_packed_sequence_indices). SDPA and eager compute the whole flattened micro-batch.
PER_SEQUENCE_ATTENTION = {"flash_attention_2", "flash_attention_3", "flex_attention"}


def attended_length(lengths: list[int], rows: list[int], attention: str) -> float:
    """The token-weighted length over which attention is really computed for sequences of `lengths` trained as
    `rows`: the token slots of each attention call (a padded row; a whole micro-batch when packed padding-free).

    Padding-free packing (TRL's collator, trl/trainer/sft_trainer.py: `input_ids = [torch.cat(input_ids, dim=0)]`)
    flattens each micro-batch into ONE sequence, so SDPA pays attention over batch x length, not length. Padded rows
    pay their padded length under SDPA; per-sequence kernels pay each sequence's own length.
    """
    if attention in PER_SEQUENCE_ATTENTION:
        return sum(n * n for n in lengths) / sum(lengths)
    return sum(r * r for r in rows) / sum(rows)


def published_mfu(anchor: Anchor) -> float:
    """The MFU a published figure implies, with our FLOPs formula and the GPU's peak."""
    setting = ANCHOR_SETTING
    flops = flops_per_token(LLAMA2_7B, setting["lora_r"], setting["length"])  # unpacked full rows: T = length
    return anchor.tokens_per_s * flops / GPUS[anchor.gpu].peak_flops


def named_gpu(name: str) -> Gpu:
    """The GPU of that name (case-insensitive), or a user error listing the known ones."""
    known = {key.lower(): gpu for key, gpu in GPUS.items()}
    if name.lower() not in known:
        raise UserError(f"unknown GPU {name!r}; choose from {', '.join(GPUS)}")
    return known[name.lower()]


def gpu_facts(gpu: Gpu, facts: Facts) -> Facts:
    """This launch's facts (processes, FSDP, ...) as they would be on that GPU; flash-attn assumed not installed
    (an optional package the default install lacks)."""
    distributed = facts.distributed_type
    if distributed == DistributedType.MULTI_CPU:
        distributed = DistributedType.MULTI_GPU
    return dataclasses.replace(
        facts,
        cuda=True,
        capability=gpu.capability,
        flash_attn_2=False,
        distributed_type=distributed,
        gpu_name=gpu.device_name,
        memory_gb=gpu.memory_gb,
        peak_flops=gpu.peak_flops,
    )


def precision_of(facts: Facts) -> str:
    return "bfloat16" if has_native_bf16(facts) else "float16"
