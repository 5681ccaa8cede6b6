"""Interruption and resume, refusing to clobber finished runs, and keeping secrets out of everything saved."""

import json
import os
import signal
import sys

import pytest
from helpers import run_command, start_command, wait_for
from safetensors import safe_open

from sft.common.errors import UserError
from sft.train.checkpoints import checkpoint_to_resume, latest_complete_checkpoint

RUN = ["python", "sft/run.py", "--config", "recipes/smoke.yaml", "--eval_strategy", "no", "--logging_steps", "1"]


def losses(output_dir) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tiny_model, tmp_path):
    steps = ["--max_steps", "24", "--save_steps", "4", "--save_total_limit", "5"]
    straight = tmp_path / "straight"
    assert run_command([*RUN, *steps, "--output_dir", str(straight)]).returncode == 0

    resumed = tmp_path / "resumed"
    command = [*RUN, *steps, "--output_dir", str(resumed)]
    process = start_command(command, tmp_path / "first.log")
    wait_for(lambda: (resumed / "checkpoint-12" / "trainer_state.json").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (resumed / "run_summary.json").exists()
    # the newest fully written checkpoint on disk, by step number (checkpoint-8 sorts after checkpoint-12 by name)
    saved = resumed.glob("checkpoint-*/trainer_state.json")
    newest = max(int(p.parent.name.split("-")[1]) for p in saved if p.read_text().rstrip().endswith("}"))

    second = run_command(command)
    assert second.returncode == 0, second.stderr[-3000:]
    checkpoint = json.loads((resumed / "run_summary.json").read_text())
    assert checkpoint["global_step"] == 24
    output = second.stdout + second.stderr
    resumed_from = int(output.split("resuming from ")[1].split("checkpoint-")[1].split(" ")[0])
    assert resumed_from == newest >= 12
    assert output.count("'loss':") == 24 - resumed_from, "the rerun did not continue from the checkpoint"
    expected, got = losses(straight), losses(resumed)
    assert sorted(got) == list(range(1, 25))
    # Same seed and data order: the losses agree to float noise from the bf16 adapter weights (seen: up to
    # 3e-4 relative by step 24). Another batch order moves a step's loss by whole percents.
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-3), step


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint_and_exits_cleanly(tiny_model, tmp_path):
    output_dir = tmp_path / "out"
    log = tmp_path / "run.log"
    process = start_command([*RUN, "--max_steps", "5000", "--save_steps", "5000", "--output_dir", str(output_dir)], log)
    wait_for(lambda: "'loss':" in log.read_text(), process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    text = log.read_text()
    assert "received SIGTERM" in text and "run the same command again to resume" in text
    checkpoint = latest_complete_checkpoint(output_dir)
    assert checkpoint is not None
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as weights:
        assert any("lora_B" in key for key in weights.keys())
    assert not (output_dir / "run_summary.json").exists(), "an interrupted run must not look finished"


def make_run_folder(folder, recipe: dict, finished: bool, checkpoint_steps=(), complete=True):
    import yaml

    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    if finished:
        (folder / "run_summary.json").write_text("{}")
    for step in checkpoint_steps:
        (folder / f"checkpoint-{step}").mkdir()
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}" if complete else '{"log_hi')


def test_a_finished_run_is_never_overwritten_silently(tmp_path):
    make_run_folder(tmp_path / "run", {"lora_r": 8}, finished=True, checkpoint_steps=[10])
    for recipe, what in (({"lora_r": 8}, "this recipe"), ({"lora_r": 16}, "a different recipe")):
        with pytest.raises(UserError, match=f"finished run of {what}.*--overwrite_output_dir true"):
            checkpoint_to_resume(str(tmp_path / "run"), recipe, overwrite=False)
    assert checkpoint_to_resume(str(tmp_path / "run"), {"lora_r": 16}, overwrite=True) is None
    assert not any((tmp_path / "run").iterdir())


def test_an_unfinished_run_of_another_recipe_is_refused(tmp_path):
    make_run_folder(tmp_path / "run", {"lora_r": 8, "seed": 1}, finished=False, checkpoint_steps=[10])
    with pytest.raises(UserError, match=r"different recipe \(differs in: lora_r\)"):
        checkpoint_to_resume(str(tmp_path / "run"), {"lora_r": 16, "seed": 1}, overwrite=False)


def test_the_newest_complete_checkpoint_is_chosen_by_step_number(tmp_path):
    """Steps of different lengths: by name, checkpoint-8 would beat checkpoint-16 and checkpoint-100."""
    make_run_folder(tmp_path / "run", {"lora_r": 8}, finished=False, checkpoint_steps=[8, 16])
    (tmp_path / "run" / "checkpoint-30").mkdir()  # died before trainer_state.json
    (tmp_path / "run" / "checkpoint-100").mkdir()
    (tmp_path / "run" / "checkpoint-100" / "trainer_state.json").write_text('{"trunc')
    assert checkpoint_to_resume(str(tmp_path / "run"), {"lora_r": 8}, overwrite=False).endswith("checkpoint-16")
    assert latest_complete_checkpoint(tmp_path / "run").name == "checkpoint-16"  # what eval and merge of a run take
    assert latest_complete_checkpoint(tmp_path / "elsewhere") is None


@pytest.mark.slow
def test_secrets_never_reach_logs_or_saved_files(tiny_model, tmp_path):
    secrets = {"HF_TOKEN": "hf_FAKEsecretTOKEN123", "WANDB_API_KEY": "FAKEwandbKEY456"}
    hub_token = "hf_FAKEflagTOKEN789"
    output_dir = tmp_path / "out"
    result = run_command(
        [*RUN, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(output_dir), "--hub_token", hub_token],
        env={**secrets, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = [p for p in output_dir.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in written)
    for secret in [*secrets.values(), hub_token]:
        assert secret not in result.stdout + result.stderr
        for path in written:
            assert secret.encode() not in path.read_bytes(), f"{secret} found in {path}"


def test_overwrite_never_empties_a_folder_that_holds_no_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="does not hold a training run"):
        checkpoint_to_resume(str(tmp_path), {"lora_r": 8}, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_hub_token_flag_is_masked_in_the_recorded_command_line(monkeypatch):
    from types import SimpleNamespace

    from sft.train.trainer import keep_hub_token_out_of_saved_files

    monkeypatch.setattr("sys.argv", ["sft/run.py", "--hub_token", "hf_SECRET"])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    args = SimpleNamespace(hub_token="hf_SECRET")
    keep_hub_token_out_of_saved_files(args)
    assert args.hub_token is None and os.environ["HF_TOKEN"] == "hf_SECRET"
    assert "hf_SECRET" not in " ".join(sys.argv)
