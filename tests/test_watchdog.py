"""A run whose training breaks (NaN or infinite loss or gradient norm, a loss of exactly 0) stops itself, names the
step, the figure and the likely causes, keeps its last good checkpoint and exits non-zero; a rerun resumes there."""

import math

import pytest
from helpers import run_command
from transformers import TrainerControl, TrainerState

from sft.train.watchdog import StopOnBadSteps, bad_figure

RUN = ["python", "sft/run.py", "--config", "recipes/smoke.yaml", "--eval_strategy", "no", "--logging_steps", "1"]


@pytest.mark.parametrize(
    ("logs", "figure"),
    [
        ({"loss": 2.5, "grad_norm": 1.0}, None),
        ({"loss": math.nan, "grad_norm": 1.0}, "loss nan"),
        ({"loss": math.inf}, "loss inf"),
        ({"loss": 2.5, "grad_norm": math.nan}, "grad_norm nan"),
        ({"loss": 2.5, "grad_norm": -math.inf}, "grad_norm -inf"),
        ({"loss": 0.0, "grad_norm": 0.0}, "loss exactly 0"),
        ({"loss": 1e-9}, None),
    ],
)
def test_what_counts_as_a_bad_step(logs, figure):
    assert bad_figure(logs) == figure


def feed(watch: StopOnBadSteps, losses: list[float]) -> TrainerControl:
    state, control = TrainerState(), TrainerControl()
    watch.on_train_begin(None, state, control)
    for step, loss in enumerate(losses, start=1):
        state.global_step = step
        control.should_save = True
        watch.on_log(None, state, control, logs={"loss": loss})
        if control.should_training_stop:
            break
    return control


def test_only_consecutive_bad_steps_up_to_the_limit_stop_the_run():
    watch = StopOnBadSteps(3)
    control = feed(watch, [2.0, math.nan, math.nan, 1.9, math.nan, math.nan, 0.0, 1.5])
    assert watch.first_bad == (5, "loss nan") and control.should_training_stop
    assert not control.should_save  # the step that tips it over is not saved
    assert watch.last_good_step == 4

    patient = StopOnBadSteps(3)
    assert not feed(patient, [2.0, math.nan, math.nan, 1.9, math.nan, 1.8]).should_training_stop
    assert patient.first_bad is None


def test_zero_turns_the_watch_off():
    watch = StopOnBadSteps(0)
    assert not feed(watch, [math.nan] * 10).should_training_stop and watch.first_bad is None


def test_evaluation_logs_are_not_training_steps():
    watch = StopOnBadSteps(1)
    state, control = TrainerState(global_step=3), TrainerControl()
    watch.on_log(None, state, control, logs={"eval_loss": math.nan})
    assert not control.should_training_stop


@pytest.mark.slow
def test_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_resumes_there(tiny_model, tmp_path):
    output_dir = tmp_path / "diverging"
    steps = ["--learning_rate", "1e3", "--max_steps", "12", "--save_steps", "2"]
    command = [*RUN, *steps, "--output_dir", str(output_dir)]
    first = run_command(command)
    assert first.returncode == 2, first.stderr[-3000:]
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in first.stderr
    assert "training stopped: " in errors[0] and " at step " in errors[0] and "learning rate" in errors[0]
    kept = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    aside = sorted(p.name for p in output_dir.glob("diverged-checkpoint-*"))
    assert kept and aside, (kept, aside)
    assert f"the last good checkpoint is {output_dir / kept[-1]}" in errors[0]
    assert not (output_dir / "run_summary.json").exists() and not (output_dir / "adapter_model.safetensors").exists()

    again = run_command(command)
    assert f"resuming from {output_dir / kept[-1]}" in again.stderr, again.stderr[-3000:]


@pytest.mark.slow
def test_a_run_whose_labels_are_all_masked_stops(tiny_model, tmp_path):
    official = (tiny_model / "chat_template.jinja").read_text(encoding="utf-8")
    # the replies are rendered outside the generation markers, which now wrap nothing: no token is supervised
    assert "{{ ' ' + content.strip() + ' ' + eos_token }}" in official
    masked = official.replace(
        "{{ ' ' + content.strip() + ' ' + eos_token }}",
        "{% generation %}{% endgeneration %}{{ ' ' + content.strip() + ' ' + eos_token }}",
    )
    template = tmp_path / "masked.jinja"
    template.write_text(masked, encoding="utf-8")
    output_dir = tmp_path / "masked"
    command = [*RUN, "--max_steps", "6", "--chat_template_path", str(template), "--output_dir", str(output_dir)]
    result = run_command(command)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "every label masked" in errors[0], errors
    assert not (output_dir / "run_summary.json").exists()
