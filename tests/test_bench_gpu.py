"""The GPU benchmark: its 7B shape and FLOP count, and a real run of its scaled-down shape on the CPU."""

import json
import sys

import pytest
import torch
from helpers import run_command
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.bench_gpu import LLAMA2_7B, fastest_attention, flops_per_token, peak_bf16_flops

LLAMA2_7B_PARAMETERS = 6_738_415_616  # meta-llama/Llama-2-7b-hf


def test_the_benchmark_model_has_llama2_7b_shape_and_6n_flops():
    """Every weight but the embedding lookup and the norms enters a matrix product: those make N in 6 N."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B))
    total = sum(p.numel() for p in model.parameters())
    assert total == LLAMA2_7B_PARAMETERS
    lookup_and_norms = model.model.embed_tokens.weight.numel()
    lookup_and_norms += sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert flops_per_token(LLAMA2_7B, mean_length=0) == 6 * (total - lookup_and_norms)
    attention = flops_per_token(LLAMA2_7B, mean_length=1024) - flops_per_token(LLAMA2_7B, mean_length=0)
    assert attention == 12 * 32 * 4096 * 1024


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", None),
    ],
)
def test_the_gpu_peak_is_known_by_name(name, peak):
    assert peak_bf16_flops(name) == peak


def test_the_small_shape_runs_on_cpu_and_reports_every_variant(tmp_path):
    output = tmp_path / "speed.json"
    result = run_command(
        [sys.executable, "benchmarks/bench_gpu.py", "--small", "--lengths", "64", "--output", str(output)],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    rows = {row["key"]: row for row in report["results"]}
    assert set(rows) == {"sdpa", "sdpa-no-ckpt", "fa2", f"{fastest_attention()}-liger"}
    for key in ("sdpa", "sdpa-no-ckpt"):
        assert rows[key]["status"] == "ok", rows[key]
        assert rows[key]["tokens_per_s"] > 0 and rows[key]["peak_memory_gb"] > 0 and rows[key]["model_tflops_per_s"] > 0
    if not torch.cuda.is_available():
        assert rows["sdpa"]["mfu"] is None  # no known peak for a CPU
        assert rows["fa2"]["status"] == rows["sdpa-liger"]["status"] == "skipped"
        assert "GPU" in rows["fa2"]["reason"] and "GPU" in rows["sdpa-liger"]["reason"]
    assert "| sdpa-no-ckpt | sdpa | off | off | 64 |" in result.stdout
    assert "2,415" in result.stdout and "3,726" in result.stdout
