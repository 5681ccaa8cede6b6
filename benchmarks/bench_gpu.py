"""QLoRA training speed of a Llama-2-7B-shaped model on one GPU: tokens/s, peak memory and MFU, offline.

    python benchmarks/bench_gpu.py             # or `make bench-gpu`: under 5 minutes on one H200
    python benchmarks/bench_gpu.py --small     # a scaled-down shape, on a CPU in under a minute (what the test runs;
                                               # also what runs where there is no GPU)

Builds Llama-2-7B's exact shape (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocabulary 32000) from random
weights generated on the GPU (nothing is downloaded), quantizes it to 4-bit NF4 with double quantization through
transformers' bitsandbytes loader, and times real `SFTTrainer` steps with LoRA on every linear layer (r=64,
alpha 16, dropout 0.1, bf16, paged AdamW 32-bit: recipes/lccc_base.yaml) on random token sequences packed
without padding (TRL's `bfd`) into rows of 1024 and 2048 tokens, 4 rows per batch and 2 accumulation steps
(LLaMA-Factory's setting). Every variant and length gets a freshly built model. Variants: SDPA with activation
checkpointing (what the launcher picks without FlashAttention-2), SDPA without it, FlashAttention-2 and Liger
kernels (`use_liger_kernel`), each measured where installed and listed as skipped otherwise.

Throughput counts the tokens of the steps after the warm-up ones. MFU is model FLOPs over the GPU's dense bf16
peak: 6 N per token (N: the weights of all matrix products, the LM head included, the embedding lookup not)
plus 12 x layers x hidden x the tokens-weighted mean sequence length for attention (PaLM's count, with the
length of the packed sequences, which do not attend to each other). Saves benchmarks/results/speed_gpu.json
(speed_gpu_small.json for --small) and prints a Markdown table with LLaMA-Factory's A100 reference points.
"""

import argparse
import gc
import json
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import datasets
import torch
import transformers
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models
from transformers import (
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from transformers.utils import is_flash_attn_2_available, is_liger_kernel_available
from trl import SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LLAMA2_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
}
SMALL = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 352,
    "vocab_size": 2048,
}
# Dense bf16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets; the first key found in the GPU's name wins.
# Other GPUs: pass --peak_tflops.
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
]
# LLaMA-Factory's published comparison: Llama-2-7B on one A100, batch 4, gradient accumulation 2, LoRA r=8,
# length 1024.
REFERENCES = [
    {"name": "LLaMA-Factory reference: Hugging Face QLoRA 4-bit (A100, r=8)", "tokens_per_s": 2415, "memory_gb": 9},
    {"name": "LLaMA-Factory reference: unsloth QLoRA 4-bit (A100, r=8)", "tokens_per_s": 3726, "memory_gb": 7},
]
PAD, BOS, EOS, FIRST_WORD = 0, 1, 2, 3
FULL_SETTINGS = {"lengths": [1024, 2048], "batch_size": 4, "grad_accum": 2, "lora_r": 64, "warmup_steps": 2, "steps": 4}
SMALL_SETTINGS = {"lengths": [64, 128], "batch_size": 2, "grad_accum": 1, "lora_r": 16, "warmup_steps": 1, "steps": 2}


@dataclass(frozen=True)
class Variant:
    """One way of running the same training step."""

    key: str
    attention: str
    checkpointing: bool
    liger: bool = False


VARIANTS = {
    "sdpa": Variant("sdpa", "sdpa", checkpointing=True),
    "sdpa-no-ckpt": Variant("sdpa-no-ckpt", "sdpa", checkpointing=False),
    "fa2": Variant("fa2", "flash_attention_2", checkpointing=True),
    "fa2-no-ckpt": Variant("fa2-no-ckpt", "flash_attention_2", checkpointing=False),
    "fa2-liger": Variant("fa2-liger", "flash_attention_2", checkpointing=True, liger=True),
    "sdpa-liger": Variant("sdpa-liger", "sdpa", checkpointing=True, liger=True),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="scaled-down shape and settings (CPU-friendly)")
    parser.add_argument(
        "--variants",
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: sdpa, sdpa-no-ckpt, fa2, and Liger on top "
        "of FlashAttention-2 where it runs, else of SDPA)",
    )
    parser.add_argument("--lengths", type=int, nargs="+", help="max_length of the packed rows (1024 2048)")
    parser.add_argument("--batch_size", type=int, help="packed rows per device and micro-batch (4)")
    parser.add_argument("--grad_accum", type=int, help="gradient accumulation steps (2)")
    parser.add_argument("--lora_r", type=int, help="LoRA rank (64; 8 matches LLaMA-Factory's reference runs)")
    parser.add_argument("--warmup_steps", type=int, help="optimizer steps run before timing starts (2)")
    parser.add_argument("--steps", type=int, help="optimizer steps timed (4)")
    parser.add_argument("--peak_tflops", type=float, help="the accelerator's dense bf16 peak, if not recognised")
    parser.add_argument("--time_budget_s", type=float, default=240, help="skip a measurement that would end later")
    parser.add_argument("--output", type=Path, help="results JSON (default benchmarks/results/speed_gpu*.json)")
    args = parser.parse_args(argv)
    if not args.small and not torch.cuda.is_available():
        print("no GPU here: running the scaled-down shape (--small); the 7B shape needs a GPU", file=sys.stderr)
        args.small = True
    for key, value in (SMALL_SETTINGS if args.small else FULL_SETTINGS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = args.variants or ",".join(["sdpa", "sdpa-no-ckpt", "fa2", f"{fastest_attention()}-liger"])
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--warmup_steps and --steps must be at least 1 (the first step is never timed)")
    return args


def fastest_attention() -> str:
    """fa2 where FlashAttention-2 runs (installed, Ampere-or-newer GPU), else sdpa: the launcher's choice."""
    usable = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8 and is_flash_attn_2_available()
    return "fa2" if usable else "sdpa"


def missing_for(variant: Variant, device: torch.device) -> str | None:
    """Why a variant cannot run here, or None when it can."""
    if variant.attention == "flash_attention_2":
        if device.type != "cuda" or torch.cuda.get_device_capability()[0] < 8:
            return "FlashAttention-2 needs an Ampere-or-newer GPU"
        if not is_flash_attn_2_available():
            return "flash-attn is not installed"
    if variant.liger:
        if device.type != "cuda":
            return "Liger kernels need a GPU"
        if not is_liger_kernel_available():
            return "liger-kernel is not installed"
    return None


def placeholder_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with Llama's special-token ids only: the data is already token ids, nothing is downloaded."""
    vocab = {"<unk>": PAD, "<s>": BOS, "</s>": EOS}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


def random_sequences(tokens: int, max_length: int, vocab_size: int, seed: int = 0) -> Dataset:
    """Random token sequences of max_length/16 to max_length/2 tokens, at least `tokens` in all, to be packed."""
    generator = torch.Generator().manual_seed(seed)
    rows, total = [], 0
    while total < tokens:
        length = int(torch.randint(max_length // 16, max_length // 2 + 1, (1,), generator=generator))
        rows.append([BOS, *torch.randint(FIRST_WORD, vocab_size, (length - 1,), generator=generator).tolist()])
        total += length
    return Dataset.from_dict({"input_ids": rows})


def weighted_mean_length(dataset: Dataset) -> float:
    """The mean sequence length as a token sees it (sum of squared lengths over sum of lengths)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return sum(n * n for n in lengths) / sum(lengths)


def random_state_dict(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights for every tensor of the architecture, generated directly on `device`."""
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    state = {}
    for name, tensor in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(tensor.shape, device=device, dtype=dtype)
        else:
            state[name] = torch.empty(tensor.shape, device=device, dtype=dtype).normal_(0, config.initializer_range)
    return state


def build_model(shape: dict, attention: str, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """The architecture with random weights, quantized to 4-bit NF4 by transformers' bitsandbytes loader."""
    config = LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    state = random_state_dict(config, device, dtype)
    model = LlamaForCausalLM.from_pretrained(
        None,
        config=config,
        state_dict=state,
        quantization_config=quantization,
        dtype=dtype,
        device_map={"": device.index if device.type == "cuda" else "cpu"},
        attn_implementation=attention,
    )
    del state
    release_memory()
    return model


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Throughput(TrainerCallback):
    """Wall time and input tokens of the optimizer steps after the warm-up ones."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.start = self.end = None
        self.tokens_at_start = self.tokens_at_end = 0

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        now = time.perf_counter()
        if state.global_step == self.warmup_steps:
            self.start, self.tokens_at_start = now, state.num_input_tokens_seen
        self.end, self.tokens_at_end = now, state.num_input_tokens_seen

    def tokens_per_second(self) -> float:
        return (self.tokens_at_end - self.tokens_at_start) / (self.end - self.start)


def training_config(args, variant: Variant, length: int, device: torch.device, output_dir: str) -> SFTConfig:
    """The launcher's settings for a real run, cut to a few steps of packed rows."""
    on_gpu = device.type == "cuda"
    return SFTConfig(
        output_dir=output_dir,
        max_steps=args.warmup_steps + args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        optim="paged_adamw_32bit" if on_gpu else "adamw_torch",
        bf16=on_gpu,
        use_cpu=not on_gpu,
        packing=True,
        packing_strategy="bfd",
        max_length=length,
        activation_checkpointing=variant.checkpointing,
        use_liger_kernel=variant.liger,
        include_num_input_tokens_seen="all",  # padding-free packing: every slot is a real token
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )


def flops_per_token(shape: dict, mean_length: float) -> float:
    """6 N for the weights of all matrix products plus PaLM's attention term at the given sequence length."""
    hidden, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = hidden * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * shape["intermediate_size"]
    matmul_weights = layers * per_layer + hidden * vocab
    return 6 * matmul_weights + 12 * layers * hidden * mean_length


def peak_bf16_flops(gpu_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU known by name, else None."""
    return next((flops for key, flops in PEAK_BF16 if key in gpu_name), None)


def accelerator_and_peak(device: torch.device, override_tflops: float | None) -> tuple[str, float | None]:
    """The accelerator's name and its dense bf16 peak FLOP/s (None when unknown: no MFU then)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    if override_tflops:
        return name, override_tflops * 1e12
    return name, peak_bf16_flops(name) if device.type == "cuda" else None


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "process_max_rss"


def measure(args, shape: dict, variant: Variant, length: int, device: torch.device, peak: float | None) -> dict:
    """Build a fresh 4-bit model, train a few packed steps with LoRA, and report speed, memory and MFU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(shape, variant.attention, device, dtype)
    tokens_needed = (args.warmup_steps + args.steps + 1) * args.batch_size * args.grad_accum * length
    dataset = random_sequences(int(tokens_needed * 1.2), length, shape["vocab_size"])
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    timer = Throughput(args.warmup_steps)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = SFTTrainer(
            model=model,
            args=training_config(args, variant, length, device, output_dir),
            train_dataset=dataset,
            processing_class=placeholder_tokenizer(),
            peft_config=lora,
            callbacks=[timer],
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
    memory, memory_kind = peak_memory_gb(device)
    tokens_per_s = timer.tokens_per_second()
    model_flops = flops_per_token(shape, weighted_mean_length(dataset))
    del trainer, model
    release_memory()
    return {
        "status": "ok",
        "tokens_per_s": round(tokens_per_s, 1),
        "step_time_s": round((timer.end - timer.start) / args.steps, 3),
        "peak_memory_gb": round(memory, 2),
        "peak_memory_kind": memory_kind,
        "model_flops_per_token": round(model_flops),
        "model_tflops_per_s": float(f"{tokens_per_s * model_flops / 1e12:.4g}"),
        "mfu": round(tokens_per_s * model_flops / peak, 4) if peak else None,
    }


def run_all(args, shape: dict, device: torch.device, peak: float | None) -> list[dict]:
    """Every chosen variant at every length, with skips (not installed, no time left) and failures as rows."""
    started = time.perf_counter()
    longest = 0.0
    results = []
    for key in args.variants.split(","):
        variant = VARIANTS[key]
        missing = missing_for(variant, device)
        for length in args.lengths:
            row = {**asdict(variant), "max_length": length}
            cell_started = time.perf_counter()
            if missing:
                row |= {"status": "skipped", "reason": missing}
            elif cell_started - started + longest > args.time_budget_s:
                row |= {"status": "skipped", "reason": f"would overrun the time budget of {args.time_budget_s:.0f} s"}
            else:
                row |= run_guarded(args, shape, variant, length, device, peak)
                longest = max(longest, time.perf_counter() - cell_started)
            print(f"{key} @ {length}: {row.get('tokens_per_s', row.get('reason'))}", file=sys.stderr, flush=True)
            results.append(row)
    return results


def run_guarded(args, shape: dict, variant: Variant, length: int, device: torch.device, peak) -> dict:
    """One measurement; out of memory or a broken fast path becomes a row of the table, not the end of the run."""
    try:
        return measure(args, shape, variant, length, device, peak)
    except torch.OutOfMemoryError:
        failure = "out of memory"
    except Exception as err:  # a fast path's kernel failing on this stack is a result worth reporting
        failure = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    release_memory()  # out here, where the failed attempt's frames (and its model) are gone
    return {"status": "failed", "reason": failure}


def markdown_table(results: list[dict], args, accelerator: str) -> str:
    """Our rows, then the reference points."""
    lines = [
        f"{accelerator}, LoRA r={args.lora_r}, {args.batch_size} packed rows x {args.grad_accum} accumulation steps",
        "",
        "| variant | attention | checkpointing | Liger | length | tokens/s/GPU | peak memory | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        flags = f"| {r['key']} | {r['attention']} | {'on' if r['checkpointing'] else 'off'} | "
        flags += f"{'on' if r['liger'] else 'off'} | {r['max_length']} |"
        if r["status"] != "ok":
            lines.append(f"{flags} {r['status']}: {r['reason']} | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"{flags} {r['tokens_per_s']:,.0f} | {r['peak_memory_gb']:.1f} GB | {mfu} |")
    for ref in REFERENCES:
        lines.append(f"| {ref['name']} | | | | 1024 | {ref['tokens_per_s']:,} | {ref['memory_gb']} GB | |")
    return "\n".join(lines)


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv=None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    shape = SMALL if args.small else LLAMA2_7B
    accelerator, peak = accelerator_and_peak(device, args.peak_tflops)
    results = run_all(args, shape, device, peak)
    packages = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "flash-attn", "liger-kernel")
    report = {
        "accelerator": accelerator,
        "peak_bf16_flops": peak,
        "shape": shape,
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "versions": {name: installed(name) for name in packages},
        "results": results,
        "references": REFERENCES,
    }
    output = args.output or RESULTS / ("speed_gpu_small.json" if args.small else "speed_gpu.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown_table(results, args, accelerator))
    print(f"\nsaved {output}")


if __name__ == "__main__":
    main()
