"""One cell of benchmarks/bench_gpu.py, run in its own process: the random 7B-shaped checkpoint and one timing."""

import gc
import json
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

from benchmarks.common import BOS, EOS, FIRST_WORD, PAD, VARIANTS, attended_length
from sft.train.machine import peak_memory


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


def load_4bit(checkpoint: str, attention: str) -> LlamaForCausalLM:
    """The checkpoint quantized to 4-bit NF4 with double quantization as it is read, on the first GPU (or CPU)."""
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
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
    model = load_4bit(cell["checkpoint"], variant.attention)
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
            bf16=on_gpu,
            use_cpu=not on_gpu,
            packing=variant.packing,
            packing_strategy="bfd",
            max_length=length,
            activation_checkpointing=variant.checkpointing,
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
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(model.device)
        trainer.train()
    memory = peak_memory(model.device)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    del trainer, model
    gc.collect()
    return {
        "status": "ok",
        "tokens_per_s": round(timer.tokens_per_second(), 1),
        "step_time_s": round((timer.end - timer.start) / steps, 3),
        "peak_allocated_gb": round(memory["allocated"] / 1e9, 2),
        "peak_reserved_gb": round(memory["reserved"] / 1e9, 2),
        "paged_optimizer_gb": round(memory["paged_optimizer"] / 1e9, 3),
        "peak_memory_kind": memory["kind"],
        "attended_length": attended_length(lengths, length, variant.attention, variant.packing),
    }
