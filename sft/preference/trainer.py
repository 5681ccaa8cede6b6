"""Preference tuning with TRL's DPOTrainer: the SFT run's adapter trains on, the SFT adapter is the reference
(or, with `method: orpo`, with TRL's experimental ORPOTrainer, which needs no reference).

One 4-bit base is loaded, with the SFT adapter on it (a PeftModel, `default`). Given such a model and no
`ref_model`, TRL 1.x's DPOTrainer copies the adapter under the name `ref` and computes the reference
log-probabilities with it (trl/trainer/dpo_trainer.py: `model.add_adapter("ref", ...)`, then
`use_adapter(model, "ref")`); only with a new adapter (`peft_config`) would the reference be the bare base.
That copy is never saved: a DPO run's folder (and its checkpoints) hold the trained adapter only, as an SFT run's.
"""

import shutil
from importlib.metadata import version
from pathlib import Path

from datasets import DatasetDict
from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl import DPOTrainer, get_quantization_config

from sft.common.errors import UserError
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


class SFTReferenceDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer, saving the trained adapter only.

    PeftModel.save_pretrained writes every adapter, the reference copy into `ref/`; it is the SFT run's adapter,
    rebuilt from the SFT run when training resumes, so it is left out of checkpoints and of the published run.
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        shutil.rmtree(Path(output_dir or self.args.output_dir) / REFERENCE_ADAPTER, ignore_errors=True)


def check_orpo_scores_the_template_reply(tokenizer) -> None:
    """Refuse ORPO for a chat template whose replies do not end in the EOS token.

    TRL's ORPOTrainer appends EOS to a reply that does not end in it (trl/experimental/utils.py,
    `add_eos_token_if_needed`): Qwen2.5's replies end in `<|im_end|>\\n`, so it would learn `<|im_end|>\\n<|im_end|>`.
    """
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好"}]
    if (
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][-1]
        != tokenizer.eos_token_id
    ):
        raise UserError(
            "method: orpo needs a chat template whose replies end in the EOS token (TRL's ORPOTrainer appends one, "
            "and would train on a second end of turn); this run's template does not: use method: dpo"
        )


def build_preference_trainer(recipe: PreferenceRecipe, datasets: DatasetDict):
    """The recipe's method's trainer on the SFT model: SFTReferenceDPOTrainer, or ORPOTrainer for `orpo`."""
    args = recipe.training
    args.model_init_kwargs = None  # the model is built above, from them
    tokenizer = load_tokenizer(str(recipe.sft.model_path), trust_remote_code=recipe.sft.trust_remote_code)
    inputs = {
        "model": load_sft_model(recipe),
        "args": args,
        "train_dataset": datasets["train"],
        "eval_dataset": datasets.get("validation") if args.eval_strategy != "no" else None,
        "processing_class": tokenizer,
    }
    if recipe.preference.method == "orpo":
        from trl.experimental.orpo import ORPOTrainer

        check_orpo_scores_the_template_reply(tokenizer)
        trainer = ORPOTrainer(**inputs)
    else:
        trainer = SFTReferenceDPOTrainer(ref_model=None, **inputs)
    keep_lora_weights_in_fp32_under_fp16(trainer)
    keep_4bit_layers_differentiable(trainer.model)
    return trainer


def logged(log_history: list[dict], key: str) -> list[float]:
    return [entry[key] for entry in log_history if key in entry]


def first_last(values: list[float]) -> dict | None:
    return {"first": values[0], "last": values[-1], "history": values} if values else None


def preference_summary(trainer, train_runtime_s: float, train_loss: float) -> dict:
    """What the run did: its loss and reward margin over the run (training logs), steps, time and memory."""
    history = trainer.state.log_history
    memory = peak_memory(trainer.model.device)
    return {
        "stage": "dpo" if isinstance(trainer, DPOTrainer) else "orpo",
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
