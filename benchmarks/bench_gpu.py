"""QLoRA training speed of a Llama-2-7B-shaped model on one GPU: tokens/s, peak memory and MFU, offline.

    python -m benchmarks.bench_gpu             # or `make bench-gpu`: a few minutes on one H200
    python -m benchmarks.bench_gpu --small     # a scaled-down shape, on a CPU in about a minute (what the test runs;
                                               # also what runs where there is no GPU)

Writes Llama-2-7B's exact shape (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocabulary 32000) with random
bf16 weights to a temporary checkpoint, one layer per file, so that nothing is downloaded and no full bf16 copy
ever sits on the GPU: transformers' bitsandbytes loader reads it tensor by tensor and quantizes it to 4-bit NF4
with double quantization (a 16 GB card suffices). Each cell (variant x length) then runs in its own process,
pinned to one GPU (paged optimizer buffers are never freed within a process, and the Trainer refuses several
GPUs in one process), and times 10 real `SFTTrainer` optimizer steps (after 2 untimed ones; 3 after 1 with --small),
each on its own for the spread, with LoRA on every linear layer (r=64, alpha 16, dropout 0.1, paged AdamW 32-bit:
recipes/lccc_base.yaml) in the precision the launcher would use there (bf16; fp16 below compute capability 8.0,
sft/train/plan.py) on random token sequences packed without padding (TRL's `bfd`) into rows of 1024 and 2048 tokens,
4 rows per batch and 2 accumulation steps. Variants: SDPA with activation checkpointing, SDPA without it,
flex_attention, FlashAttention-2 and Liger kernels, measured where they can run and listed as skipped otherwise. One
more row reproduces LLaMA-Factory's published setting (LoRA r=8, batch 4, accumulation 2, rows of 1024 tokens, no
packing) beside their 2,415 tokens/GPU/s on an A100, with the MFU that figure implies; across GPU types compare MFU,
not tokens/s.

Model FLOPs per token (sft/train/gpus.py, shared with `lccc-sft plan --gpu`): 4 N for the frozen 4-bit weights,
6 N_LoRA, and PaLM's 12 x layers x hidden x T for attention, T the length whose attention is really computed: each
packed sequence's own under FlashAttention-2 and flex_attention, the whole micro-batch under SDPA (TRL's
padding-free collator concatenates the packed rows of a micro-batch into one sequence, and SDPA's mask does not skip
the blocks it hides). Recomputation under checkpointing is not counted (model FLOPs, not hardware FLOPs). Memory:
peak allocated and reserved by torch, the paged optimizer states bitsandbytes keeps outside torch's allocator, and
their sum with the CUDA context, which is what nvidia-smi shows. Saves benchmarks/results/speed_gpu.json
(speed_gpu_small.json for --small) and prints a Markdown table.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from transformers.utils import is_liger_kernel_available, is_torch_flex_attn_available

from benchmarks.common import RESULTS, ROOT, VARIANTS, Variant
from sft.train.gpus import ANCHOR_SETTING, ANCHORS, LLAMA2_7B, flops_per_token, precision_of, published_mfu
from sft.train.machine import attention_for, machine_facts

SMALL = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 352,
    "vocab_size": 2048,
}
# LLaMA-Factory's published comparison (sft/train/gpus.py), with the MFU each figure implies.
REFERENCES = [
    {"name": a.name, "tokens_per_s": a.tokens_per_s, "memory_gb": a.memory_gb, "mfu": round(published_mfu(a), 4)}
    for a in ANCHORS
]
# At least 10 timed steps per GPU row, for their spread; the CPU form (the suite's) times 3 to stay short.
FULL_SETTINGS = {
    "lengths": [1024, 2048],
    "batch_size": 4,
    "grad_accum": 2,
    "lora_r": 64,
    "warmup_steps": 2,
    "steps": 10,
}
SMALL_SETTINGS = {"lengths": [64, 128], "batch_size": 2, "grad_accum": 1, "lora_r": 16, "warmup_steps": 1, "steps": 3}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="scaled-down shape and settings (CPU-friendly)")
    parser.add_argument(
        "--variants",
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: sdpa, sdpa-no-ckpt, fa2, Liger on top of "
        "the launcher's attention, and LLaMA-Factory's setting with it)",
    )
    parser.add_argument("--lengths", type=int, nargs="+", help="max_length of the packed rows (1024 2048)")
    parser.add_argument("--batch_size", type=int, help="packed rows per device and micro-batch (4)")
    parser.add_argument("--grad_accum", type=int, help="gradient accumulation steps (2)")
    parser.add_argument("--lora_r", type=int, help="LoRA rank (64)")
    parser.add_argument("--warmup_steps", type=int, help="optimizer steps run before timing starts (2; 1 --small)")
    parser.add_argument(
        "--steps", type=int, help="optimizer steps timed, each on its own for the spread (10; 3 --small)"
    )
    parser.add_argument("--peak_tflops", type=float, help="the accelerator's dense bf16 peak, if not recognised")
    parser.add_argument("--time_budget_s", type=float, default=240, help="skip a measurement that would end later")
    parser.add_argument("--output", type=Path, help="results JSON (default benchmarks/results/speed_gpu*.json)")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one measurement and print its row
    args = parser.parse_args(argv)
    if args.cell:
        return args
    if not args.small and not torch.cuda.is_available():
        print("no GPU here: running the scaled-down shape (--small); the 7B shape needs a GPU", file=sys.stderr)
        args.small = True
    for key, value in (SMALL_SETTINGS if args.small else FULL_SETTINGS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    fastest = "fa2" if launcher_attention() == "flash_attention_2" else "sdpa"
    args.variants = args.variants or f"sdpa,sdpa-no-ckpt,flex,fa2,{fastest}-liger,llamafactory-{fastest}"
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--warmup_steps and --steps must be at least 1 (the first step is never timed)")
    return args


def launcher_attention() -> str:
    """What sft/train/plan.py picks for a bf16 run on this machine (one place for the rule: sft/train/machine.py)."""
    return attention_for(machine_facts(), "bfloat16", packed=True)


def missing_for(variant: Variant, facts) -> str | None:
    """Why a variant cannot run on a machine with these facts, or None when it can."""
    if variant.attention == "flash_attention_2" and attention_for(facts, "bfloat16") != "flash_attention_2":
        if not facts.cuda or facts.capability < (8, 0):
            return "FlashAttention-2 needs an Ampere-or-newer GPU"
        return "flash-attn is not installed"
    if variant.attention == "flex_attention":
        if not is_torch_flex_attn_available():
            return "this torch has no flex_attention"
        if not facts.cuda:
            return "flex_attention has no backward on CPU (torch's _validate_device)"
    if variant.liger:
        if not facts.cuda:
            return "Liger kernels need a GPU"
        if not is_liger_kernel_available():
            return "liger-kernel is not installed"
    return None


def cells(args) -> list[dict]:
    """Every measurement: each chosen variant at each length; LLaMA-Factory's rows at their own setting."""
    out = []
    for key in args.variants.split(","):
        variant = VARIANTS[key]
        if not variant.packing:
            setting = dict(ANCHOR_SETTING)
            if args.small:
                setting = {**setting, "length": args.lengths[0], "lora_r": 8, "batch_size": 2, "grad_accum": 1}
            out.append({"variant": key, **setting})
            continue
        for length in args.lengths:
            out.append(
                {
                    "variant": key,
                    "length": length,
                    "batch_size": args.batch_size,
                    "grad_accum": args.grad_accum,
                    "lora_r": args.lora_r,
                }
            )
    return out


def peak_flops(device_name: str, override_tflops: float | None, dtype: str = "bfloat16") -> float | None:
    """The accelerator's dense peak FLOP/s in `dtype` (TRL's table), or the override; None when unknown (no MFU)."""
    from trl.trainer.utils import get_peak_flops

    return override_tflops * 1e12 if override_tflops else get_peak_flops(device_name, dtype)


def one_gpu_env(environ: dict) -> dict:
    """The environment of a cell: the first visible GPU only (the Trainer refuses DataParallel over several)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    return {**environ, "CUDA_VISIBLE_DEVICES": visible}


def run_cell(cell: dict, checkpoint: Path, args, timeout: float) -> dict:
    """One measurement in its own process; a crash, out of memory or timeout becomes the row's reason."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_gpu",
        "--cell",
        json.dumps({**cell, "checkpoint": str(checkpoint)}),
    ]
    command += ["--warmup_steps", str(args.warmup_steps), "--steps", str(args.steps)]
    try:
        env = one_gpu_env(dict(os.environ))
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"no result within {timeout:.0f} s"}
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no output")
        return {"status": "failed", "reason": reason[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_all(args, shape: dict, checkpoint: Path, facts, peak: float | None, dtype: str) -> list[dict]:
    """Every cell, with skips (not installed, no time left) and failures as rows."""
    started, longest, results = time.perf_counter(), 0.0, []
    for cell in cells(args):
        variant = VARIANTS[cell["variant"]]
        row = {**asdict(variant), **{k: v for k, v in cell.items() if k != "variant"}}
        missing = missing_for(variant, facts)
        cell_started = time.perf_counter()
        left = args.time_budget_s - (cell_started - started)
        if missing:
            row |= {"status": "skipped", "reason": missing}
        elif left < longest:
            row |= {"status": "skipped", "reason": f"would overrun the time budget of {args.time_budget_s:.0f} s"}
        else:
            row |= run_cell({**cell, "dtype": dtype}, checkpoint, args, timeout=max(left, 60))
            longest = max(longest, time.perf_counter() - cell_started)
        if row["status"] == "ok":
            model_flops = flops_per_token(shape, cell["lora_r"], row["attended_length"])
            row["model_flops_per_token"] = round(model_flops)
            row["model_tflops_per_s"] = float(f"{row['tokens_per_s'] * model_flops / 1e12:.4g}")
            row["mfu"] = round(row["tokens_per_s"] * model_flops / peak, 4) if peak else None
        print(f"{cell['variant']} @ {cell['length']}: {row.get('tokens_per_s', row.get('reason'))}", file=sys.stderr)
        results.append(row)
    return results


def markdown_table(results: list[dict], accelerator: str) -> str:
    """Our rows, then the reference points."""
    lines = [
        f"{accelerator}: rows of `length` tokens, `batch` rows x `accum` steps per optimizer step",
        "",
        "| variant | attention | ckpt | Liger | packing | r | batch x accum | length | tokens/s/GPU (range over steps) "
        "| peak allocated / reserved / paged optimizer | as nvidia-smi | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        flags = f"| {r['key']} | {r['attention']} | {'on' if r['checkpointing'] else 'off'} | "
        flags += f"{'on' if r['liger'] else 'off'} | {'on' if r['packing'] else 'off'} | {r['lora_r']} | "
        flags += f"{r['batch_size']} x {r['grad_accum']} | {r['length']} |"
        if r["status"] != "ok":
            lines.append(f"{flags} {r['status']}: {r['reason']} | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        spread = f"{r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f}, {r['timed_steps']} steps"
        memory = f"{r['peak_allocated_gb']:.1f} / {r['peak_reserved_gb']:.1f} / {r['paged_optimizer_gb']:.2f}"
        smi = f"{r['peak_nvidia_smi_gb']:.1f} GB" if r["peak_nvidia_smi_gb"] is not None else "n/a (CPU)"
        lines.append(f"{flags} {r['tokens_per_s']:,.0f} ({spread}) | {memory} GB | {smi} | {mfu} |")
    for ref in REFERENCES:
        setting = "| | | | off | 8 | 4 x 2 | 1024 |"
        figures = f"{ref['tokens_per_s']:,} | | {ref['memory_gb']} GB | {ref['mfu']:.1%} |"
        lines.append(f"| {ref['name']} {setting} {figures}")
    return "\n".join(lines)


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cell:
        from benchmarks.bench_gpu_cell import measure

        print(json.dumps(measure(json.loads(args.cell), args.warmup_steps, args.steps)))
        return
    from benchmarks.bench_gpu_cell import write_random_checkpoint

    facts = machine_facts()
    shape = SMALL if args.small else LLAMA2_7B
    accelerator = torch.cuda.get_device_name(0) if facts.cuda else platform.processor() or "CPU"
    dtype = precision_of(facts) if facts.cuda else "float32"  # the launcher's: fp16 below compute capability 8.0
    peak = peak_flops(accelerator, args.peak_tflops, dtype) if facts.cuda else None
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as checkpoint:
        write_random_checkpoint(shape, Path(checkpoint))
        results = run_all(args, shape, Path(checkpoint), facts, peak, dtype)
    packages = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "flash-attn", "liger-kernel")
    report = {
        "accelerator": accelerator,
        "precision": dtype,
        "peak_flops": peak,
        "shape": shape,
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "cell")},
        "versions": {name: installed(name) for name in packages},
        "results": results,
        "references": REFERENCES,
    }
    output = args.output or RESULTS / ("speed_gpu_small.json" if args.small else "speed_gpu.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown_table(results, accelerator))
    print(f"\nsaved {output}")


if __name__ == "__main__":
    main()
