"""Recipe parsing: recipe keys and `--flag` overrides, and one clear line for every mistake."""

import dataclasses
import os

import pytest
from helpers import SMOKE_RECIPE, run_command

from sft.common.arguments import parse_arguments
from sft.common.config import parse_recipe, save_resolved_recipe
from sft.common.errors import UserError


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_recipe_values_reach_all_three_dataclasses():
    recipe = parse_recipe(["--config", str(SMOKE_RECIPE)])
    assert recipe.model.load_in_4bit is True
    assert recipe.model.lora_target_modules == "all-linear"  # PEFT's shorthand, as TRL passes it on
    assert recipe.training.learning_rate == 3e-3
    assert recipe.training.assistant_only_loss is True
    assert recipe.data.max_turns == 3


def test_flags_override_the_recipe_and_are_recorded(tmp_path):
    recipe = parse_recipe(
        ["--config", str(SMOKE_RECIPE), "--learning_rate", "1e-5", "--num_train_epochs", "5", "--max_turns", "2"]
    )
    assert recipe.training.learning_rate == 1e-5
    assert recipe.training.num_train_epochs == 5
    assert recipe.data.max_turns == 2
    recipe.training.output_dir = str(tmp_path)
    saved = save_resolved_recipe(recipe, str(tmp_path)).read_text()
    assert "learning_rate: 1.0e-05" in saved and "max_turns: 2" in saved


def test_yaml_numbers_without_a_dot_are_still_numbers(tmp_path):
    # PyYAML reads `2e-4` as a string; the recipe must still mean the number.
    recipe = parse_recipe(["--config", write(tmp_path, "learning_rate: 2e-4\nlora_r: 64\nbf16: false\n")])
    assert recipe.training.learning_rate == pytest.approx(2e-4)
    assert recipe.model.lora_r == 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rat: 1.0e-4\n", "unknown recipe key `learning_rat` (did you mean `learning_rate`?)"),
        ("learning_rate: fast\n", "recipe key `learning_rate`: expected float, got 'fast'"),
        ("lora_r: 8.5\n", "recipe key `lora_r`: expected int, got 8.5"),
        ("bnb_4bit_quant_type: nf8\n", "recipe key `bnb_4bit_quant_type`: 'nf8' is not one of fp4, nf4"),
        ("max_turns: 0\n", "max_turns must be at least 1"),
        ("learning_rate: [1\n", "is not valid YAML at line 2"),
        ("- a list\n", "must be a mapping"),
    ],
)
def test_recipe_mistakes_are_reported_clearly(tmp_path, text, message):
    with pytest.raises(UserError) as err:
        parse_recipe(["--config", write(tmp_path, text)])
    assert message in str(err.value)


def test_unknown_flag_gets_the_closest_name():
    with pytest.raises(UserError, match=r"unknown option `--num_train_epoch` \(did you mean `num_train_epochs`\?\)"):
        parse_recipe(["--config", str(SMOKE_RECIPE), "--num_train_epoch", "2"])


def test_bad_flag_value_is_one_line_not_a_usage_page():
    with pytest.raises(UserError, match="learning_rate"):
        parse_recipe(["--config", str(SMOKE_RECIPE), "--learning_rate", "fast"])


def test_missing_recipe_file():
    with pytest.raises(UserError, match="recipe file not found: nope.yaml"):
        parse_recipe(["--config", "nope.yaml"])


@pytest.mark.slow
def test_the_launcher_stops_with_one_line_and_exit_code_2(tmp_path):
    result = run_command(["python", "sft/run.py", "--config", write(tmp_path, "learning_rat: 1.0e-4\n")])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown recipe key `learning_rat` (did you mean `learning_rate`?)"
    )


def test_a_negated_flag_sets_its_field_and_is_recorded_under_it():
    recipe = parse_recipe(["--config", str(SMOKE_RECIPE), "--no_remove_unused_columns"])
    assert recipe.training.remove_unused_columns is False
    assert recipe.resolved["remove_unused_columns"] is False and "no_remove_unused_columns" not in recipe.resolved


def test_run_controls_are_not_part_of_the_recorded_recipe():
    recipe = parse_recipe(["--config", str(SMOKE_RECIPE), "--overwrite_output_dir", "true", "--seed", "7"])
    assert recipe.run.overwrite_output_dir is True
    assert "overwrite_output_dir" not in recipe.resolved and recipe.resolved["seed"] == 7


def test_config_equals_form_and_env_mapping(tmp_path, monkeypatch):
    monkeypatch.delenv("LCCC_TEST_VAR", raising=False)
    path = write(tmp_path, "lora_r: 4\nbf16: false\nenv:\n  LCCC_TEST_VAR: on\n")
    recipe = parse_recipe([f"--config={path}"])
    assert recipe.model.lora_r == 4
    assert os.environ["LCCC_TEST_VAR"] == "True"
    with pytest.raises(UserError, match="`env` must be a mapping"):
        parse_recipe(["--config", write(tmp_path, "env: [A]\n")])


def test_a_recipe_with_the_newer_checkpointing_name_runs_on_an_older_transformers():
    """transformers < 5.23 (the GPU machines here have 5.17) knows `gradient_checkpointing` only: a recipe's
    `activation_checkpointing` and the `--activation_checkpointing` flag set it there."""

    @dataclasses.dataclass
    class OlderTrainingArguments:  # as transformers 5.17's TrainingArguments spells it
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    recipe = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
    (older,) = parse_arguments((OlderTrainingArguments,), recipe=recipe).values
    assert older.gradient_checkpointing and older.gradient_checkpointing_kwargs == {"use_reentrant": False}
    (older,) = parse_arguments((OlderTrainingArguments,), ["--activation_checkpointing", "false"], recipe=recipe).values
    assert older.gradient_checkpointing is False
    (older,) = parse_arguments((OlderTrainingArguments,), ["--activation-checkpointing=false"], recipe=recipe).values
    assert older.gradient_checkpointing is False
    newer = parse_recipe(["--config", "recipes/smoke.yaml", "--activation_checkpointing", "false"]).training
    assert newer.activation_checkpointing is False  # where the newer name exists it is used as it is


def test_an_option_that_collects_its_values_may_be_repeated_and_others_may_not():
    @dataclasses.dataclass
    class Words:
        word: list[str] | None = dataclasses.field(default=None, metadata={"action": "extend"})
        count: int = 1

    (words,) = parse_arguments((Words,), ["--word", "a", "--word", "b"]).values
    assert words.word == ["a", "b"]
    with pytest.raises(UserError, match="--count is given twice"):
        parse_arguments((Words,), ["--count", "1", "--count", "2"])
