"""Training: SFTTrainer on a 4-bit base with LoRA, loss on assistant replies only, and what a run leaves behind."""

import json
import logging
import netrc
import os
import resource
import time
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import torch
from datasets import DatasetDict
from trl import SFTTrainer, get_peft_config, get_quantization_config

from sft.config import Recipe, save_resolved_recipe
from sft.errors import UserError
from sft.model import load_tokenizer, model_init_kwargs

logger = logging.getLogger(__name__)
VERSIONED_PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")


class CountingSFTTrainer(SFTTrainer):
    """SFTTrainer that also counts the tokens that carried loss during training."""

    supervised_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.supervised_tokens += int((inputs["labels"][..., 1:] != -100).sum())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def wandb_has_credentials() -> bool:
    """An API key in the environment or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def use_wandb_offline_without_login(report_to: list[str], output_dir: str) -> None:
    """Never prompt for a wandb login: without credentials, log offline next to the run and say how to sync."""
    if "wandb" not in report_to or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return
    if wandb_has_credentials():
        return
    os.environ["WANDB_MODE"] = "offline"
    wandb_dir = os.environ.get("WANDB_DIR") or str(Path(output_dir).resolve())
    Path(wandb_dir).mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DIR"] = wandb_dir
    logger.warning(
        "wandb: no API key or login found, logging offline to %s/wandb; upload later with "
        "`wandb sync %s/wandb/offline-run-*`",
        wandb_dir,
        wandb_dir,
    )


def peak_memory_mb() -> tuple[float, str]:
    """Peak accelerator memory when training on CUDA, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def build_trainer(recipe: Recipe, datasets: DatasetDict) -> CountingSFTTrainer:
    args = recipe.training
    if args.include_num_input_tokens_seen == "no":
        args.include_num_input_tokens_seen = "non_padding"
    args.model_init_kwargs = model_init_kwargs(recipe.model, args)
    tokenizer = load_tokenizer(recipe.model, args)
    evaluating = args.eval_strategy != "no"
    if evaluating and not len(datasets.get("validation", [])):
        raise UserError("eval_strategy asks for evaluation but the data has no validation samples (see val_size)")
    args.eval_on_start = args.eval_on_start and evaluating
    return CountingSFTTrainer(
        model=recipe.model.model_name_or_path,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"] if evaluating else None,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(recipe.model),
        peft_config=get_peft_config(recipe.model),
    )


def run_summary(trainer: CountingSFTTrainer, train_runtime_s: float, train_loss: float) -> dict:
    eval_losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    device = trainer.accelerator.device
    supervised = trainer.accelerator.reduce(torch.tensor(trainer.supervised_tokens, device=device), "sum").item()
    train_tokens = int(trainer.state.num_input_tokens_seen)
    memory, memory_kind = peak_memory_mb()
    return {
        "train_loss": train_loss,
        "eval_loss": {"first": eval_losses[0], "last": eval_losses[-1], "history": eval_losses}
        if eval_losses
        else None,
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_samples": len(trainer.train_dataset),
        "train_runtime_s": round(train_runtime_s, 3),
        "train_tokens": train_tokens,
        "supervised_tokens": int(supervised),
        "tokens_per_second": round(train_tokens / train_runtime_s, 2),
        "supervised_tokens_per_second": round(supervised / train_runtime_s, 2),
        "peak_memory_mb": round(memory, 1),
        "peak_memory_kind": memory_kind,
        "num_processes": trainer.accelerator.num_processes,
        "versions": {name: version(name) for name in VERSIONED_PACKAGES},
    }


def train(recipe: Recipe, datasets: DatasetDict) -> dict:
    """Train, then save the adapter, tokenizer, trainer state, resolved recipe and `run_summary.json`."""
    args = recipe.training
    use_wandb_offline_without_login(args.report_to, args.output_dir)
    trainer = build_trainer(recipe, datasets)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    summary = run_summary(trainer, time.perf_counter() - start, result.training_loss)
    trainer.save_model(args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        save_resolved_recipe(recipe, args.output_dir)
        (Path(args.output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        logger.info("run finished: adapter and run_summary.json in %s", args.output_dir)
    trainer.accelerator.end_training()
    return summary
