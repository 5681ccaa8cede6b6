"""The GPU benchmark and `make gpu-check`: FLOP count, one GPU per cell, skips, and a real run of the CPU form."""

import dataclasses
import json
import sys

import pytest
import torch
from helpers import run_command
from peft import LoraConfig, get_peft_model
from test_gpu_plan import H100
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import bench_gpu as bench_gpu_module
from benchmarks.bench_gpu import (
    LLAMA2_7B,
    SMALL,
    flops_per_token,
    missing_for,
    one_gpu_env,
    peak_flops,
)
from benchmarks.common import VARIANTS, attended_length

CPU = dataclasses.replace(H100, cuda=False, capability=None)

LLAMA2_7B_PARAMETERS = 6_738_415_616  # meta-llama/Llama-2-7b-hf


def test_frozen_4bit_weights_cost_4n_and_lora_weights_6n():
    """The frozen base gets no weight gradient (forward 2N, input gradient 2N); the LoRA weights get all three.
    N is every weight that enters a matrix product: all but the embedding lookup and the norms."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B))
    total = sum(p.numel() for p in model.parameters())
    assert total == LLAMA2_7B_PARAMETERS
    lookup_and_norms = model.model.embed_tokens.weight.numel()
    lookup_and_norms += sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert flops_per_token(LLAMA2_7B, lora_r=0, attended_length=0) == 4 * (total - lookup_and_norms)
    attention = flops_per_token(LLAMA2_7B, 0, attended_length=1024) - flops_per_token(LLAMA2_7B, 0, 0)
    assert attention == 12 * 32 * 4096 * 1024


def test_the_lora_flops_count_the_weights_peft_trains():
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert flops_per_token(SMALL, 8, 0) - flops_per_token(SMALL, 0, 0) == 6 * trainable


def test_sdpa_pays_for_the_whole_packed_row_flash_attention_for_each_sequence():
    lengths = [100, 300, 600]
    assert attended_length(lengths, 1024, "sdpa", packing=True) == 1024
    assert attended_length(lengths, 1024, "flash_attention_2", packing=True) == pytest.approx(460)
    assert attended_length([1024, 1024], 1024, "sdpa", packing=False) == 1024


def test_each_cell_sees_one_gpu():
    """With several GPUs visible the Trainer would wrap the model in DataParallel, which SFTTrainer refuses."""
    assert one_gpu_env({"CUDA_VISIBLE_DEVICES": "2,3"})["CUDA_VISIBLE_DEVICES"] == "2"
    assert one_gpu_env({})["CUDA_VISIBLE_DEVICES"] == "0"


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", None),  # no bf16 tensor cores
    ],
)
def test_the_gpu_peak_is_known_by_name(name, peak):
    assert peak_flops(name, None) == peak


@pytest.mark.parametrize(
    ("facts", "fa2", "liger"),
    [
        (H100, None, None),
        (dataclasses.replace(H100, flash_attn_2=False), "flash-attn is not installed", None),
        (dataclasses.replace(H100, capability=(7, 5)), "FlashAttention-2 needs an Ampere-or-newer GPU", None),
        (CPU, "FlashAttention-2 needs an Ampere-or-newer GPU", "Liger kernels need a GPU"),
    ],
)
def test_a_variant_that_cannot_run_here_is_skipped_with_the_reason(facts, fa2, liger, monkeypatch):
    monkeypatch.setattr(bench_gpu_module, "is_liger_kernel_available", lambda: True)
    assert missing_for(VARIANTS["fa2"], facts) == fa2
    assert missing_for(VARIANTS["sdpa-liger"], facts) == liger
    assert missing_for(VARIANTS["sdpa"], facts) is None


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_form_end_to_end(tiny_model, tmp_path):
    """`make gpu-check` without CUDA: a run stopped by SIGTERM resumes to its last step, and the benchmark rows of
    the packed launcher setting and LLaMA-Factory's setting are measured."""
    output = tmp_path / "gpu_check.json"
    result = run_command([sys.executable, "-m", "benchmarks.gpu_check", "--output", str(output)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = json.loads(output.read_text())["steps"]
    resumed = steps["sigterm_then_resume"]
    assert resumed["status"] == "ok" and resumed["resumed_to_step"] == resumed["global_step"] == 24
    assert int(resumed["stopped_at"].split("-")[1]) < 24
    bench = steps["benchmark_rows"]
    assert bench["status"] == "ok" and {row["key"] for row in bench["results"]} == {"sdpa", "llamafactory-sdpa"}
    for row in bench["results"]:  # each cell ran in its own process and reported speed, memory and model FLOPs
        assert row["tokens_per_s"] > 0 and row["peak_allocated_gb"] > 0 and row["model_tflops_per_s"] > 0
        assert row["mfu"] is None or 0 < row["mfu"] < 1
    assert "| llamafactory-sdpa | sdpa | on | off | off | 8 |" in result.stdout
    assert "2,415" in result.stdout and "3,726" in result.stdout
    if not torch.cuda.is_available():
        assert steps["smoke_on_cuda"]["status"] == steps["two_processes"]["status"] == "skipped"
