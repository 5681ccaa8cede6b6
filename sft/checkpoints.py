"""Never lose training: resume from the newest complete checkpoint, stop cleanly on signals, save atomically."""

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from transformers import TrainerCallback

from sft.config import RECIPE_FILE
from sft.errors import UserError

logger = logging.getLogger(__name__)
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
FINISHED_MARKER = "run_summary.json"  # written last: its presence means the run finished and saved everything


def is_complete_checkpoint(folder: Path) -> bool:
    """Trainer writes `trainer_state.json` after the weights, optimizer and RNG state, so it marks completion."""
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders in `output_dir`, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint that was fully written; half-written ones (a crash during the save) are skipped."""
    for folder in reversed(checkpoints(output_dir)):
        if is_complete_checkpoint(folder):
            return folder
        logger.warning("ignoring %s: it was not completely written (the run died while saving it)", folder)
    return None


def recipe_differences(saved: dict, current: dict) -> list[str]:
    return sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))


def looks_like_a_run(folder: Path) -> bool:
    return (folder / RECIPE_FILE).is_file() or (folder / FINISHED_MARKER).is_file() or bool(checkpoints(folder))


def clear_earlier_run(output_dir: Path) -> None:
    """Delete what an earlier run left in `output_dir` (only on the user's explicit `overwrite_output_dir`)."""
    if not looks_like_a_run(output_dir):
        raise UserError(
            f"overwrite_output_dir: {output_dir} does not hold a training run (no recipe.yaml, run_summary.json or "
            "checkpoint-*), so nothing in it is deleted; choose a new or empty output_dir"
        )
    for path in output_dir.iterdir():
        logger.warning("overwrite_output_dir: deleting %s", path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def checkpoint_to_resume(output_dir: str, resolved_recipe: dict, overwrite: bool) -> str | None:
    """Decide how a run starts in `output_dir`: fresh, resumed from its newest complete checkpoint, or refused.

    A folder holding a finished run, or an unfinished one of another recipe, is never reused silently: the
    user must pass `--overwrite_output_dir true` (which deletes it) or pick another folder.
    """
    folder = Path(output_dir)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    if overwrite:
        clear_earlier_run(folder)
        return None
    recipe_path = folder / RECIPE_FILE
    saved = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() else None
    if (folder / FINISHED_MARKER).is_file():
        what = "this recipe" if saved == resolved_recipe else "a different recipe"
        raise UserError(
            f"{output_dir} already holds a finished run of {what}; choose another output_dir or pass "
            "`--overwrite_output_dir true` to delete it and train again"
        )
    if saved is not None and saved != resolved_recipe:
        raise UserError(
            f"{output_dir} holds an unfinished run of a different recipe (differs in: "
            f"{', '.join(recipe_differences(saved, resolved_recipe))}); rerun with that recipe to resume it, "
            "choose another output_dir, or pass `--overwrite_output_dir true` to delete it"
        )
    checkpoint = latest_complete_checkpoint(folder)
    if checkpoint is None:
        return None
    logger.warning("resuming from %s (the newest complete checkpoint in %s)", checkpoint, output_dir)
    return str(checkpoint)


class StopOnSignal(TrainerCallback):
    """On SIGTERM/SIGINT finish the current step, save a checkpoint and stop, on every rank at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None  # the signal this process got, if any
        self.stopped = False  # True once any rank got one: every rank then stops at the same step
        self.previous = {sig: signal.signal(sig, self._receive) for sig in self.SIGNALS}

    def _receive(self, signum, frame):
        if self.received is None:
            name = signal.Signals(signum).name
            logger.warning("received %s: saving a checkpoint after this step, then stopping", name)
        self.received = signum

    def _any_rank_received(self) -> bool:
        flag = torch.tensor(float(self.received is not None))
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            flag = flag.to(device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received():
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True

    def restore_handlers(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def publish_final_outputs(staging: Path, output_dir: Path, summary: dict) -> None:
    """Move the saved adapter and tokenizer into place file by file, then write `run_summary.json` last.

    Each move is an atomic rename, and only the summary marks the folder finished, so a crash at any point
    never leaves a folder that looks complete.
    """
    for path in sorted(staging.iterdir()):
        os.replace(path, output_dir / path.name)
    staging.rmdir()
    marker = output_dir / FINISHED_MARKER
    partial = marker.with_suffix(".json.tmp")
    partial.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    os.replace(partial, marker)
