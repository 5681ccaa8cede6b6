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
from benchmarks.bench_gpu import REFERENCES, SMALL, markdown_table, missing_for, one_gpu_env, peak_flops
from benchmarks.bench_gpu_cell import Throughput, attention_figures
from benchmarks.common import VARIANTS
from sft.train.gpus import LLAMA2_7B, attended_length, flops_per_token

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


def test_sdpa_pays_for_the_whole_flattened_micro_batch_flash_and_flex_for_each_sequence():
    """TRL's padding-free collator concatenates the micro-batch's packed rows into one sequence: SDPA's attention
    runs over all of it (4 rows of 1024 tokens: 4096), FlashAttention-2's and flex's over each sequence."""
    rows = [[100, 300, 600], [500, 500], [1000], [1000]]
    assert attention_figures(rows, batch_size=4, packing=True, attention="sdpa") == 4000
    assert attention_figures(rows, batch_size=2, packing=True, attention="sdpa") == 2000
    per_sequence = (100**2 + 300**2 + 600**2 + 2 * 500**2 + 2 * 1000**2) / 4000
    assert attention_figures(rows, 4, True, "flash_attention_2") == attention_figures(rows, 4, True, "flex_attention")
    assert attention_figures(rows, 4, True, "flex_attention") == pytest.approx(per_sequence)
    assert attention_figures([[1024], [1024]], 4, packing=False, attention="sdpa") == 1024  # padded rows: their own
    assert attended_length([100, 300], [400, 1000], "sdpa") == pytest.approx((400**2 + 1000**2) / 1400)


class Step:
    def __init__(self, global_step, tokens):
        self.global_step, self.num_input_tokens_seen = global_step, tokens


def test_every_timed_step_is_kept_for_the_spread(monkeypatch):
    from benchmarks import bench_gpu_cell

    clock = iter([0.0, 1.0, 3.0, 4.0, 8.0])  # step 1 is warm-up; steps 2-5 take 1, 2, 1, 4 s for 100 tokens each
    monkeypatch.setattr(bench_gpu_cell.time, "perf_counter", lambda: next(clock))
    timer = Throughput(warmup_steps=1)
    for step in range(1, 6):
        timer.on_step_end(None, Step(step, 100 * step), None)
    figures = timer.figures()
    assert figures["timed_steps"] == 4 and figures["tokens_per_s"] == pytest.approx(400 / 8)
    assert figures["step_time_s"] == {"median": 1.5, "min": 1.0, "max": 4.0, "stdev": pytest.approx(2**0.5, abs=1e-4)}
    assert (figures["tokens_per_s_min"], figures["tokens_per_s_max"]) == (25.0, 100.0)


def test_the_reference_rows_carry_the_mfu_their_figures_imply():
    assert [ref["mfu"] for ref in REFERENCES] == [pytest.approx(0.218, abs=1e-3), pytest.approx(0.336, abs=1e-3)]
    assert "| 2,415 | | 9 GB | 21.8% |" in markdown_table([], "NVIDIA A100-SXM4-80GB")


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


def test_a_t4_is_measured_in_fp16_against_its_fp16_peak():
    """The precision the launcher would use there (sft/train/plan.py), and the peak of that precision."""
    from test_gpu_plan import T4

    from sft.train.gpus import precision_of

    assert precision_of(T4) == "float16" and peak_flops("Tesla T4", None, "float16") == 65e12


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
    flex = "flex_attention has no backward on CPU (torch's _validate_device)" if not facts.cuda else None
    assert missing_for(VARIANTS["flex"], facts) == flex
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
