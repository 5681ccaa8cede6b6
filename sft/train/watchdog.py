"""Stop a run whose training has broken instead of training on for hours: a loss or gradient norm that is NaN or
infinite, or a loss of exactly 0 (every label masked), for `stop_after_bad_steps` logged steps in a row.

The run then keeps its last good checkpoint (checkpoints saved after the last good logged step are kept aside as
`diverged-checkpoint-N`, out of the resume's way), publishes nothing, and ends with one message and exit code 2.
"""

import math
from pathlib import Path

from transformers import TrainerCallback

from sft.train.checkpoints import complete_checkpoints, set_aside

LIKELY_CAUSES = (
    "likely causes: a learning rate too high (lower `learning_rate`), fp16 overflowing on an older GPU (lower the "
    "learning rate or `max_grad_norm`, or train in bf16 where the GPU has it), or every label masked (a chat "
    "template whose replies carry no generation markers, or a `max_length` too short to hold a reply)"
)


def bad_figure(logs: dict) -> str | None:
    """What is wrong with one training log line, or None when it looks like training."""
    loss, grad_norm = logs.get("loss"), logs.get("grad_norm")
    if loss is not None and not math.isfinite(loss):
        return f"loss {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"grad_norm {grad_norm}"
    if loss == 0:
        return "loss exactly 0"
    return None


class StopOnBadSteps(TrainerCallback):
    """Count consecutive bad training logs (every rank sees the same gathered figures) and stop at the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.bad_run: list[tuple[int, str]] = []  # (step, figure) of the current run of bad logs
        self.last_good_step = 0
        self.first_bad: tuple[int, str] | None = None  # set when the run was stopped

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_good_step = state.global_step  # a resumed run starts from a good checkpoint

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.limit or not logs or "loss" not in logs:  # evaluation and the final summary have no "loss"
            return
        figure = bad_figure(logs)
        if figure is None:
            self.bad_run.clear()
            self.last_good_step = state.global_step
            return
        self.bad_run.append((state.global_step, figure))
        if len(self.bad_run) >= self.limit:
            self.first_bad = self.bad_run[0]
            control.should_save = False  # this step's weights are not worth keeping
            control.should_evaluate = False
            control.should_training_stop = True

    def set_aside_checkpoints_after_last_good_step(self, output_dir: Path) -> None:
        """Their weights may already be broken: a resume must start from the last good one."""
        for checkpoint in complete_checkpoints(output_dir):
            if int(checkpoint.name.rsplit("-", 1)[1]) > self.last_good_step:
                set_aside(checkpoint, "diverged")

    def message(self, last_good: Path | None) -> str:
        step, figure = self.first_bad
        since = f"{len(self.bad_run)} logged steps in a row from step {step}"
        resume = (
            f"the last good checkpoint is {last_good}: run the same command to resume from it, or change the recipe "
            f"and pass `--resume_from_checkpoint {last_good}`"
            if last_good
            else "no checkpoint was saved before it: the run would start over"
        )
        return f"training stopped: {figure} at step {step} ({since}); {LIKELY_CAUSES}; {resume}"
