"""Preference tuning with TRL's DPOTrainer: the SFT run's adapter trains on, the SFT adapter is the reference.

One 4-bit base is loaded, with the SFT adapter on it (a PeftModel, `default`). Given such a model and no
`ref_model`, TRL 1.x's DPOTrainer copies the adapter under the name `ref` and computes the reference
log-probabilities with it (trl/trainer/dpo_trainer.py: `model.add_adapter("ref", ...)`, then
`use_adapter(model, "ref")`); only with a new adapter (`peft_config`) would the reference be the bare base.
"""

from importlib.metadata import version

from datasets import DatasetDict
from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl import DPOTrainer, get_quantization_config

from sft.common.model import keep_4bit_layers_differentiable, load_tokenizer, model_init_kwargs
from sft.preference.config import PreferenceRecipe
from sft.train.machine import peak_memory
from sft.train.trainer import VERSIONED_PACKAGES, keep_lora_weights_in_fp32_under_fp16

REFERENCE_ADAPTER = "ref"  # the name TRL's DPOTrainer gives its frozen copy of the adapter


def load_sft_model(recipe: PreferenceRecipe):
    """The 4-bit base as the SFT run trained it, with the SFT adapter on it, trainable."""
    base = AutoModelForCausalLM.from_pretrained(
        recipe.model.model_name_or_path,
        quantization_config=get_quantization_config(recipe.model),
        **model_init_kwargs(recipe.model, recipe.training),
    )
    return PeftModel.from_pretrained(base, recipe.sft.model_path, is_trainable=True)


def build_dpo_trainer(recipe: PreferenceRecipe, datasets: DatasetDict) -> DPOTrainer:
    args = recipe.training
    args.model_init_kwargs = None  # the model is built above, from them
    tokenizer = load_tokenizer(str(recipe.sft.model_path), trust_remote_code=recipe.sft.trust_remote_code)
    trainer = DPOTrainer(
        model=load_sft_model(recipe),
        ref_model=None,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("validation") if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
    )
    keep_lora_weights_in_fp32_under_fp16(trainer)
    keep_4bit_layers_differentiable(trainer.model)
    return trainer


def logged(log_history: list[dict], key: str) -> list[float]:
    return [entry[key] for entry in log_history if key in entry]


def first_last(values: list[float]) -> dict | None:
    return {"first": values[0], "last": values[-1], "history": values} if values else None


def preference_summary(trainer: DPOTrainer, train_runtime_s: float, train_loss: float) -> dict:
    """What the run did: its loss and reward margin over the run (training logs), steps, time and memory."""
    history = trainer.state.log_history
    memory = peak_memory(trainer.model.device)
    return {
        "stage": "dpo",
        "train_loss": train_loss,
        "loss": first_last(logged(history, "loss")),
        "reward_margin": first_last(logged(history, "rewards/margins")),
        "reward_accuracy": first_last(logged(history, "rewards/accuracies")),
        "eval_loss": first_last(logged(history, "eval_loss")),
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_pairs": len(trainer.train_dataset),
        "train_runtime_s": round(train_runtime_s, 3),
        "peak_memory_mb": round(memory["allocated"] / 2**20, 1),
        "peak_memory_kind": memory["kind"],
        "num_processes": trainer.accelerator.num_processes,
        "versions": {name: version(name) for name in VERSIONED_PACKAGES},
    }
