"""Training: SFTTrainer on a 4-bit base with LoRA, loss on assistant replies only, and what a run leaves behind."""

import copy
import logging
import netrc
import os
import shutil
import signal
import sys
import time
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import torch
from accelerate import PartialState
from datasets import DatasetDict
from peft import NoMatchingPeftModuleError
from transformers import TrainerCallback
from trl import SFTTrainer, get_peft_config, get_quantization_config
from trl.chat_template_utils import has_generation_markers

from sft.common.config import Recipe, save_resolved_recipe
from sft.common.errors import UserError
from sft.common.files import reporting_full_disk
from sft.common.generation import GenerationArguments, save_generation_config
from sft.common.model import keep_4bit_layers_differentiable, load_tokenizer, model_init_kwargs
from sft.common.template import TEMPLATE_KINDS, training_template_kind, with_derived_reply_masks
from sft.data import held_out_by_source
from sft.train.audit import audit_before_training
from sft.train.checkpoints import (
    StopOnSignal,
    checkpoint_to_resume,
    claim_output_dir,
    how_to_go_on,
    latest_complete_checkpoint,
    publish_final_outputs,
    remove_if_only_the_lock,
)
from sft.train.machine import machine_facts, peak_memory
from sft.train.plan import decide
from sft.train.watchdog import StopOnBadSteps

logger = logging.getLogger(__name__)
VERSIONED_PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")


class CountingSFTTrainer(SFTTrainer):
    """SFTTrainer that also counts, in this process and session, the batch slots, real tokens and loss tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_slots = 0  # known on the host: counted there, no copy to the device
        # real tokens and tokens that carried loss; padded batches know them only on the device, so they are summed
        # there, and read once at the end (no host synchronisation per micro-batch)
        self.device_counts = torch.zeros(2, dtype=torch.long, device=self.accelerator.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            ids = inputs["input_ids"]
            self.batch_slots += ids.numel()
            self.device_counts[1] += (inputs["labels"][..., 1:] != -100).sum()
            # padding-free batches have no attention mask: every slot is a real token
            self.device_counts[0] += inputs["attention_mask"].sum() if "attention_mask" in inputs else ids.numel()
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def gathered_counts(self) -> torch.Tensor:
        """One row per process: batch slots, real tokens, supervised tokens."""
        slots = torch.tensor([self.batch_slots], device=self.device_counts.device)
        return self.accelerator.gather(torch.cat([slots, self.device_counts])[None])


class TrainingClock(TrainerCallback):
    """Seconds spent training: the run's time less evaluation and checkpoint saving (and the logging before them)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_step = time.perf_counter()
        self.elsewhere = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step = time.perf_counter()

    def _not_training(self):
        now = time.perf_counter()
        self.elsewhere += now - self.last_step
        self.last_step = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._not_training()

    def on_save(self, args, state, control, **kwargs):
        self._not_training()

    def seconds(self) -> float:
        return self.last_step - self.start - self.elsewhere


def keep_lora_weights_in_fp32_under_fp16(trainer: SFTTrainer) -> None:
    """TRL casts the LoRA weights of a quantized model to bf16, whose gradients fp16's grad scaler cannot unscale:
    under fp16 mixed precision they train in fp32 (as in PEFT's QLoRA examples for GPUs without bf16)."""
    if trainer.args.fp16 and getattr(trainer.model, "is_loaded_in_4bit", False):
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()


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


def with_derived_reply_spans(args, tokenizer, datasets: DatasetDict) -> tuple:
    """For assistant-only loss with a template without generation markers: the samples with the `assistant_masks`
    derived from the official template, from which TRL builds the labels, and `assistant_only_loss` left to them
    (TRL's own masking needs the markers). Anything else as it is."""
    if has_generation_markers(tokenizer.chat_template) or not args.assistant_only_loss:
        return args, datasets
    args = copy.copy(args)
    args.assistant_only_loss = False
    return args, DatasetDict({name: with_derived_reply_masks(tokenizer, ds) for name, ds in datasets.items()})


def build_trainer(recipe: Recipe, datasets: DatasetDict) -> CountingSFTTrainer:
    args = recipe.training
    args.model_init_kwargs = model_init_kwargs(recipe.model, args)
    tokenizer = load_tokenizer(
        recipe.model.model_name_or_path,
        revision=recipe.model.model_revision,
        trust_remote_code=args.trust_remote_code,
        chat_template_path=args.chat_template_path,
    )
    args.chat_template_path = None  # applied above; SFTTrainer must not apply it again
    logger.info("training template: %s", TEMPLATE_KINDS[training_template_kind(tokenizer.chat_template)])
    args, prepared = with_derived_reply_spans(args, tokenizer, datasets)  # a copy of args where spans are derived
    check_max_length_fits_a_turn(tokenizer, prepared["train"], args.max_length)
    evaluating = args.eval_strategy != "no"
    if evaluating and not len(prepared.get("validation", [])):
        raise UserError("eval_strategy asks for evaluation but the data has no validation samples (see val_size)")
    args.eval_on_start = args.eval_on_start and evaluating
    try:
        trainer = CountingSFTTrainer(
            model=recipe.model.model_name_or_path,
            args=args,
            train_dataset=prepared["train"],
            # a mixture is evaluated per source: eval_<label>_loss for each
            eval_dataset=(held_out_by_source(prepared, "validation") or prepared["validation"]) if evaluating else None,
            processing_class=tokenizer,
            quantization_config=get_quantization_config(recipe.model),
            peft_config=get_peft_config(recipe.model),
        )
    except NoMatchingPeftModuleError:
        raise UserError(
            f"lora_target_modules {recipe.model.lora_target_modules} name no module of "
            f"{recipe.model.model_name_or_path}; use `all-linear` or names of its linear layers (e.g. q_proj v_proj)"
        ) from None
    except RuntimeError as err:  # TRL's check while tokenizing (sft_trainer.py, assistant_only_loss)
        if "has no assistant tokens" not in str(err):
            raise
        raise UserError(
            "every label masked: the chat template marks no reply token of at least one sample, so nothing would "
            "be learned from it; check the {% generation %} markers of the template (`lccc-sft audit` shows what "
            "is supervised)"
        ) from None
    keep_lora_weights_in_fp32_under_fp16(trainer)
    keep_4bit_layers_differentiable(trainer.model)
    # the label audit on a few dozen samples, before the first step: a wrong mask stops here, not after hours
    audit_before_training(trainer, recipe.training, tokenizer.official_chat_template, datasets["train"])
    return trainer


def eval_loss_curves(log_history: list[dict]) -> dict[str, dict]:
    """Each evaluation loss a run logged (`eval_loss`, or `eval_<source>_loss` for a mixture): first, last, all."""
    curves = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith("eval_") and key.endswith("_loss"):
                curves.setdefault(key, []).append(value)
    return {key: {"first": losses[0], "last": losses[-1], "history": losses} for key, losses in curves.items()}


def run_summary(trainer: CountingSFTTrainer, train_runtime_s: float, train_loss: float) -> dict:
    """What the run did; the runtime and the speeds count training only, not evaluation or checkpoint saving."""
    curves = eval_loss_curves(trainer.state.log_history)
    counts = trainer.gathered_counts()
    slots, train_tokens, supervised = counts.sum(dim=0).tolist()
    memory = peak_memory(trainer.model.device)
    return {
        "train_loss": train_loss,
        "eval_loss": curves.pop("eval_loss", None),
        "eval_loss_by_source": {key.removeprefix("eval_").removesuffix("_loss"): c for key, c in curves.items()}
        or None,
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_samples": len(trainer.train_dataset),
        "train_runtime_s": round(train_runtime_s, 3),
        "train_tokens": train_tokens,
        "supervised_tokens": supervised,
        "supervised_tokens_per_rank": counts[:, 2].tolist(),
        "padding_share": round(1 - train_tokens / slots, 4) if slots else 0.0,
        # a rerun that resumes from the final checkpoint trains no step: no time, no speed
        "tokens_per_second": round(train_tokens / train_runtime_s, 2) if train_runtime_s > 0 else 0.0,
        "supervised_tokens_per_second": round(supervised / train_runtime_s, 2) if train_runtime_s > 0 else 0.0,
        "peak_memory_mb": round(memory["allocated"] / 2**20, 1),
        "peak_memory_reserved_mb": round(memory["reserved"] / 2**20, 1),
        "paged_optimizer_mb": round(memory["paged_optimizer"] / 2**20, 1),
        "peak_memory_kind": memory["kind"],
        "num_processes": trainer.accelerator.num_processes,
        "training_template": training_template_kind(trainer.processing_class.chat_template),
        "versions": {name: version(name) for name in VERSIONED_PACKAGES},
    }


OOM_ADVICE = (
    "CUDA ran out of memory. Use a smaller batch and keep the effective batch with gradient accumulation, "
    "and shorter samples: --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --max_length 256 "
    "(activation checkpointing stays on)"
)


def keep_hub_token_out_of_saved_files(args) -> None:
    """A `hub_token` argument would be pickled into every checkpoint's training_args.bin: pass it via HF_TOKEN."""
    if args.hub_token:
        os.environ["HF_TOKEN"] = args.hub_token
        sys.argv = [arg.replace(args.hub_token, "***") for arg in sys.argv]  # trackers record the command line
        args.hub_token = None


def check_max_length_fits_a_turn(tokenizer, train_dataset, max_length: int | None) -> None:
    """Stop when `max_length` cannot hold even the first turn of a sample: no reply would be left to learn."""
    if max_length is None or "messages" not in train_dataset.column_names:
        return
    messages = train_dataset[0]["messages"]
    first_turn = messages[: next(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1]
    length = len(tokenizer.apply_chat_template(first_turn, return_dict=True)["input_ids"])
    if length > max_length:
        raise UserError(
            f"max_length {max_length} is shorter than one turn: the first sample's first turn alone is "
            f"{length} tokens; raise max_length"
        )


def train(
    recipe: Recipe,
    datasets: DatasetDict,
    build=None,
    summarize=None,
    generation: GenerationArguments | None = None,
) -> dict | None:
    """Train (resuming when the output folder holds an interrupted run), then publish the results atomically.

    `build` makes the trainer and `summarize` its run summary (SFT's by default; the preference stage passes its
    own); `generation` is saved as the run's generation defaults. Returns the summary, or None when a signal
    stopped the run after saving a checkpoint.
    """
    args = recipe.training
    output_dir = Path(args.output_dir)
    keep_hub_token_out_of_saved_files(args)
    state = PartialState()
    created = not output_dir.exists()
    if state.is_main_process:  # the ranks of one launch share the folder; another launch stops here
        claim_output_dir(output_dir)
    try:
        with state.main_process_first():
            resume = args.resume_from_checkpoint or checkpoint_to_resume(
                args.output_dir, recipe.resolved, recipe.run.overwrite_output_dir
            )
        use_wandb_offline_without_login(args.report_to, args.output_dir)
        decide(recipe, machine_facts(args))
        trainer = (build or build_trainer)(recipe, datasets)
        if state.is_main_process:
            save_resolved_recipe(recipe, args.output_dir)
    except BaseException:
        if created and state.is_main_process:  # a mistake found before training leaves no folder behind
            remove_if_only_the_lock(output_dir)
        raise

    stopper, clock = StopOnSignal(trainer.accelerator), TrainingClock()
    watch = StopOnBadSteps(recipe.run.stop_after_bad_steps)
    for callback in (stopper, clock, watch):
        trainer.add_callback(callback)
    with reporting_full_disk(output_dir, lambda: how_to_go_on(output_dir)):
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        except torch.OutOfMemoryError:
            raise UserError(OOM_ADVICE) from None
        finally:
            stopper.restore_handlers()
    if watch.first_bad:
        if state.is_main_process:
            watch.set_aside_checkpoints_after_last_good_step(output_dir)
        state.wait_for_everyone()
        raise UserError(watch.message(latest_complete_checkpoint(output_dir)))
    if stopper.stopped:
        state.wait_for_everyone()  # no rank exits (and, under srun --kill-on-bad-exit, ends the job) mid-write
        logger.warning(
            "stopped by %s at step %d with a checkpoint in %s; run the same command again to resume",
            signal.Signals(stopper.received).name if stopper.received else "a signal to another process",
            trainer.state.global_step,
            latest_complete_checkpoint(output_dir),
        )
        return None

    summary = {
        **(summarize or run_summary)(trainer, clock.seconds(), result.training_loss),
        "dtype": recipe.model.dtype,
    }
    staging = output_dir / ".final-save"
    if state.is_main_process and staging.exists():
        shutil.rmtree(staging)
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded; the final adapter is one ordinary PEFT file
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    with reporting_full_disk(output_dir, lambda: how_to_go_on(output_dir)):
        trainer.save_model(str(staging))
        if state.is_main_process:
            trainer.state.save_to_json(str(staging / "trainer_state.json"))
            # eval/chat/serve defaults
            save_generation_config(staging, generation or GenerationArguments(), trainer.processing_class)
            publish_final_outputs(staging, output_dir, summary)
    if state.is_main_process:
        logger.info("run finished: adapter and run_summary.json in %s", output_dir)
    state.wait_for_everyone()  # every rank exits only after rank 0 has published the results
    trainer.accelerator.end_training()
    return summary
