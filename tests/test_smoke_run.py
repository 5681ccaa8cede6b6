"""The smoke run end to end through the command users type, and the wandb offline fallback."""

import json

import pytest
import yaml
from helpers import LAUNCH, SMOKE_RECIPE, reply_tokens, run_command
from safetensors import safe_open

from sft.common.config import parse_recipe
from sft.data import load_conversations

pytestmark = pytest.mark.slow  # every test here needs a training run, a server or a browser

SUMMARY_KEYS = {
    "train_loss",
    "eval_loss",
    "train_runtime_s",
    "train_tokens",
    "supervised_tokens",
    "tokens_per_second",
    "peak_memory_mb",
    "versions",
}


def test_smoke_run_saves_a_complete_output_folder(smoke_run):
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_state.json"):
        assert (smoke_run / name).is_file(), name
    with safe_open(smoke_run / "adapter_model.safetensors", "pt") as weights:
        assert any("lora_A" in key for key in weights.keys())
    assert "{% generation %}" in (smoke_run / "chat_template.jinja").read_text()
    recipe = yaml.safe_load((smoke_run / "recipe.yaml").read_text())
    assert recipe["output_dir"] == str(smoke_run) and recipe["load_in_4bit"] is True


def test_smoke_run_summary_is_complete_and_the_model_learned(smoke_run):
    summary = json.loads((smoke_run / "run_summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert set(summary["versions"]) >= {"torch", "transformers", "trl", "peft", "bitsandbytes"}
    assert 0 < summary["supervised_tokens"] < summary["train_tokens"]
    assert summary["tokens_per_second"] > 0 and summary["peak_memory_mb"] > 0
    eval_loss = summary["eval_loss"]
    assert len(eval_loss["history"]) >= 3
    assert eval_loss["last"] < 0.85 * eval_loss["first"], eval_loss


def test_the_loss_falls_on_exactly_the_reply_tokens(smoke_run, trained_tokenizer):
    """The run's supervised token count equals the reply tokens counted independently, once per epoch."""
    recipe = parse_recipe(["--config", str(SMOKE_RECIPE)])
    train = load_conversations(recipe.data, recipe.training.seed)["train"]
    per_epoch = sum(reply_tokens(m, trained_tokenizer, recipe.training.max_length) for m in train["messages"])
    summary = json.loads((smoke_run / "run_summary.json").read_text())
    assert summary["supervised_tokens"] == per_epoch * recipe.training.num_train_epochs


def test_wandb_without_login_logs_offline_and_says_how_to_sync(tiny_model, tmp_path):
    output_dir = tmp_path / "out"
    result = run_command(
        [
            *LAUNCH,
            "--config",
            "recipes/smoke.yaml",
            "--output_dir",
            str(output_dir),
            "--report_to",
            "wandb",
            "--max_steps",
            "2",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
        ],
        env={"HOME": str(tmp_path), "WANDB_API_KEY": "", "WANDB_MODE": "", "WANDB_DIR": ""},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb sync" in result.stderr
    assert list((output_dir / "wandb").glob("offline-run-*")), "no offline wandb run was written"


def test_launching_a_broken_recipe_prints_one_line_and_no_traceback(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name_or_path: build/tiny-llama\nlearning_rat: 1.0e-4\n")
    result = run_command([*LAUNCH, "--config", str(recipe)], timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "error: unknown recipe key `learning_rat` (did you mean `learning_rate`?)" in result.stderr
