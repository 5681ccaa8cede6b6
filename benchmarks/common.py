"""What several benchmarks share: where results go, and the variants and tokens of the GPU speed benchmark.

Benchmarks run from the repository root as modules (`python -m benchmarks.bench_gpu`), like `make bench-gpu`.
"""

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# The GPU benchmark's random token sequences: padding, BOS, EOS, and the first id of an ordinary word.
PAD, BOS, EOS, FIRST_WORD = 0, 1, 2, 3


@dataclass(frozen=True)
class Variant:
    """One way of running the same training step."""

    key: str
    attention: str
    checkpointing: bool
    liger: bool = False
    packing: bool = True


VARIANTS = {
    "sdpa": Variant("sdpa", "sdpa", checkpointing=True),
    "sdpa-no-ckpt": Variant("sdpa-no-ckpt", "sdpa", checkpointing=False),
    "flex": Variant("flex", "flex_attention", checkpointing=True),
    "fa2": Variant("fa2", "flash_attention_2", checkpointing=True),
    "fa2-no-ckpt": Variant("fa2-no-ckpt", "flash_attention_2", checkpointing=False),
    "fa2-liger": Variant("fa2-liger", "flash_attention_2", checkpointing=True, liger=True),
    "sdpa-liger": Variant("sdpa-liger", "sdpa", checkpointing=True, liger=True),
    "llamafactory-sdpa": Variant("llamafactory-sdpa", "sdpa", checkpointing=True, packing=False),
    "llamafactory-fa2": Variant("llamafactory-fa2", "flash_attention_2", checkpointing=True, packing=False),
}
