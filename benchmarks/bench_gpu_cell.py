"""One cell of benchmarks/bench_gpu.py, run in its own process: the random 7B-shaped checkpoint and one timing."""

import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
import transformers
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file
from tokenizers import Tokenizer, models
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import SFTConfig, SFTTrainer

from benchmarks.common import BOS, EOS, FIRST_WORD, PAD, VARIANTS
from sft.common.config import CHECKPOINTING
from sft.train.gpus import attended_length
from sft.train.machine import paged_optimizer_bytes, peak_memory
from sft.train.trainer import keep_lora_weights_in_fp32_under_fp16


def llama_config(shape: dict) -> LlamaConfig:
    return LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def write_random_checkpoint(shape: dict, folder: Path) -> None:
    """Random bf16 weights of the architecture, one safetensors file per decoder layer (plus one for the rest),
    generated on the CPU a layer at a time: neither the CPU nor the GPU ever holds the whole model in bf16."""
    config = llama_config(shape)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    groups: dict[str, dict] = {}
    for name, tensor in skeleton.state_dict().items():
        part = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(part, {})[name] = tensor.shape
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for part, shapes in groups.items():
        filename = f"model-{part}.safetensors"
        tensors = {}
        for name, size in shapes.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(size, dtype=torch.bfloat16)
            else:
                values = torch.empty(size).normal_(0, config.initializer_range, generator=generator)
                tensors[name] = values.to(torch.bfloat16)
            weight_map[name] = filename
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    config.save_pretrained(folder)


def placeholder_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with Llama's special-token ids only: the data is already token ids, nothing is downloaded."""
    vocab = {"<unk>": PAD, "<s>": BOS, "</s>": EOS}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


def random_sequences(tokens: int, max_length: int, vocab_size: int, packing: bool) -> Dataset:
    """At least `tokens` random tokens: sequences of max_length/16 to max_length/2 tokens to be packed, or rows of
    exactly max_length tokens (no padding) without packing."""
    generator = torch.Generator().manual_seed(0)
    rows, total = [], 0
    while total < tokens:
        length = max_length
        if packing:
            length = int(torch.randint(max_length // 16, max_length // 2 + 1, (1,), generator=generator))
        rows.append([BOS, *torch.randint(FIRST_WORD, vocab_size, (length - 1,), generator=generator).tolist()])
        total += length
    return Dataset.from_dict({"input_ids": rows})


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Throughput(TrainerCallback):
    """Wall time and input tokens of each optimizer step after the warm-up ones."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.last, self.tokens_at_last = None, 0
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        now = time.perf_counter()
        if state.global_step > self.warmup_steps:
            self.step_seconds.append(now - self.last)
            self.step_tokens.append(state.num_input_tokens_seen - self.tokens_at_last)
        self.last, self.tokens_at_last = now, state.num_input_tokens_seen

    def figures(self) -> dict:
        """Tokens/s over all timed steps, and the spread of the steps (time, and tokens/s of each step)."""
        seconds, rates = self.step_seconds, [t / s for t, s in zip(self.step_tokens, self.step_seconds, strict=True)]
        return {
            "tokens_per_s": round(sum(self.step_tokens) / sum(seconds), 1),
            "timed_steps": len(seconds),
            "step_time_s": {
                "median": round(statistics.median(seconds), 4),
                "min": round(min(seconds), 4),
                "max": round(max(seconds), 4),
                "stdev": round(statistics.stdev(seconds), 4) if len(seconds) > 1 else 0.0,
            },
            "tokens_per_s_min": round(min(rates), 1),
            "tokens_per_s_max": round(max(rates), 1),
        }


def attention_figures(packed_rows: list[list[int]], batch_size: int, packing: bool, attention: str) -> float:
    """The length attention really ran over: `packed_rows` holds each row's sequence lengths; TRL's padding-free
    collator flattens a micro-batch of packed rows into one sequence (see sft/train/gpus.py)."""
    lengths = [n for row in packed_rows for n in row]
    rows = [sum(row) for row in packed_rows]
    if packing:  # consecutive rows as micro-batches: bfd rows are nearly full, so the grouping hardly matters
        rows = [sum(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]
    return attended_length(lengths, rows, attention)


def cuda_context_bytes(device: torch.device) -> int:
    """GPU memory this process holds outside torch's allocator and the paged optimizer: the CUDA context and the
    kernels loaded (the cell is the only process on its GPU)."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device) - paged_optimizer_bytes()


def load_4bit(checkpoint: str, attention: str, dtype_name: str) -> LlamaForCausalLM:
    """The checkpoint quantized to 4-bit NF4 with double quantization as it is read, on the first GPU (or CPU)."""
    on_gpu = torch.cuda.is_available()
    dtype = getattr(torch, dtype_name)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    return LlamaForCausalLM.from_pretrained(
        checkpoint,
        quantization_config=quantization,
        dtype=dtype,
        device_map={"": 0 if on_gpu else "cpu"},
        attn_implementation=attention,
    )


def measure(cell: dict, warmup_steps: int, steps: int) -> dict:
    """Train a few steps with LoRA on a freshly loaded 4-bit model; report speed and memory."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    variant, length = VARIANTS[cell["variant"]], cell["length"]
    model = load_4bit(cell["checkpoint"], variant.attention, cell["dtype"])
    on_gpu = model.device.type == "cuda"
    tokens_needed = (warmup_steps + steps + 1) * cell["batch_size"] * cell["grad_accum"] * length
    dataset = random_sequences(int(tokens_needed * 1.2), length, model.config.vocab_size, variant.packing)
    lora = LoraConfig(
        r=cell["lora_r"], lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    timer = Throughput(warmup_steps)
    with tempfile.TemporaryDirectory() as output_dir:
        args = SFTConfig(
            output_dir=output_dir,
            max_steps=warmup_steps + steps,
            per_device_train_batch_size=cell["batch_size"],
            gradient_accumulation_steps=cell["grad_accum"],
            learning_rate=2e-4,
            lr_scheduler_type="constant",
            optim="paged_adamw_32bit" if on_gpu else "adamw_torch",
            bf16=cell["dtype"] == "bfloat16",
            fp16=cell["dtype"] == "float16",  # a GPU without native bf16, as the launcher decides (sft/train/plan.py)
            use_cpu=not on_gpu,
            packing=variant.packing,
            packing_strategy="bfd",
            max_length=length,
            **{CHECKPOINTING: variant.checkpointing},  # the name this transformers knows
            use_liger_kernel=variant.liger,
            include_num_input_tokens_seen="all",  # no padding (packed, or rows of full length): every slot is real
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=placeholder_tokenizer(),
            peft_config=lora,
            callbacks=[timer],
        )
        keep_lora_weights_in_fp32_under_fp16(trainer)
        packed_rows = trainer.train_dataset["seq_lengths" if variant.packing else "input_ids"]
        if not variant.packing:
            packed_rows = [[len(ids)] for ids in packed_rows]
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(model.device)
        trainer.train()
    memory = peak_memory(model.device)
    context = cuda_context_bytes(model.device) if on_gpu else None
    del trainer, model
    gc.collect()
    return {
        "status": "ok",
        **timer.figures(),
        "peak_allocated_gb": round(memory["allocated"] / 1e9, 2),
        "peak_reserved_gb": round(memory["reserved"] / 1e9, 2),
        "paged_optimizer_gb": round(memory["paged_optimizer"] / 1e9, 3),
        "cuda_context_gb": round(context / 1e9, 2) if on_gpu else None,
        # what nvidia-smi shows for the process at its peak: torch's reserved pool, the context, the paged states
        "peak_nvidia_smi_gb": round((memory["reserved"] + context + memory["paged_optimizer"]) / 1e9, 2)
        if on_gpu
        else None,
        "peak_memory_kind": memory["kind"],
        "attended_length": attention_figures(packed_rows, cell["batch_size"], variant.packing, variant.attention),
    }
