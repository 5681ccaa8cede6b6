"""Never lose training: one run per folder, resume from the newest loadable checkpoint, stop cleanly on signals."""

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import sys
import zipfile
from pathlib import Path

import yaml
from safetensors import safe_open
from transformers import TrainerCallback
from transformers.trainer_utils import sort_checkpoints

from sft.common.config import RECIPE_FILE, RUN_SUMMARY
from sft.common.errors import UserError
from sft.common.files import megabytes, write_atomically

logger = logging.getLogger(__name__)
FINISHED_MARKER = RUN_SUMMARY  # written last: its presence means the run finished and saved everything
LOCK_FILE = ".run.lock"  # holds the OS lock of the run training into the folder, and who that run is
# Where a run writes and how it reports, not what it trains: changing them does not make another recipe, so a
# moved or copied run folder, or another data cache folder, still resumes.
NOT_THE_RECIPE = {
    "output_dir",
    "logging_dir",
    "processed_dir",
    "run_name",
    "report_to",
    "log_level",
    "log_level_replica",
    "logging_strategy",
    "logging_steps",
    "logging_first_step",
    "disable_tqdm",
}
_held_locks: dict[Path, int] = {}


def claim_output_dir(output_dir: Path) -> None:
    """Make this process the only run training into `output_dir` until it ends, or stop naming the one that is.

    The lock is the kernel's (flock): it goes away with its process, so a killed run never leaves a stale lock.
    """
    key = output_dir.resolve()
    if key in _held_locks:
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot use output_dir {output_dir}: {err.strerror or err}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 4096).decode(errors="replace").strip() or "another process"
        os.close(descriptor)
        raise UserError(
            f"{output_dir} is in use by another run ({holder}); wait for it to end or choose another output_dir"
        ) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}".encode())
    _held_locks[key] = descriptor


def remove_if_only_the_lock(output_dir: Path) -> None:
    """Take back a folder this run created and left holding only its lock (it failed before writing anything)."""
    if [path.name for path in output_dir.iterdir()] != [LOCK_FILE]:
        return
    descriptor = _held_locks.pop(output_dir.resolve(), None)
    if descriptor is not None:
        os.close(descriptor)
    (output_dir / LOCK_FILE).unlink()
    output_dir.rmdir()


def is_complete_checkpoint(folder: Path) -> bool:
    """Trainer writes `trainer_state.json` after the weights, optimizer and RNG state, so it marks completion."""
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders in `output_dir`, oldest step first (by step number, as Trainer orders them)."""
    return [Path(path) for path in sort_checkpoints(str(output_dir))] if output_dir.is_dir() else []


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The fully written checkpoints, oldest first; half-written ones (a crash during the save) are skipped."""
    complete = []
    for folder in checkpoints(output_dir):
        if is_complete_checkpoint(folder):
            complete.append(folder)
        else:
            logger.warning("ignoring %s: it was not completely written (the run died while saving it)", folder)
    return complete


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def how_to_go_on(output_dir: Path) -> str:
    """After a failed save: what a rerun will do, and how big the last good checkpoint was (what the next needs)."""
    checkpoint = latest_complete_checkpoint(output_dir)
    if checkpoint is None:
        return "free some space and run the same command again: no checkpoint is complete yet, so it starts over"
    size = sum(path.stat().st_size for path in checkpoint.rglob("*") if path.is_file())
    return (
        f"a checkpoint here takes about {megabytes(size)}; free some space (or lower save_total_limit) and run the "
        f"same command again: it resumes from {checkpoint.name} and the run is not marked finished until it is saved"
    )


def damaged_file(checkpoint: Path) -> tuple[str, str] | None:
    """The first file of `checkpoint` that cannot be read back whole (truncated or corrupted), and why."""
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix in (".pt", ".pth", ".bin"):  # torch.save's zip archives, with a CRC for every record
                with zipfile.ZipFile(path) as archive:
                    if (bad := archive.testzip()) is not None:
                        raise ValueError(f"record {bad} fails its checksum")
            elif path.suffix == ".safetensors":  # the header must describe exactly the bytes in the file
                with safe_open(path, "pt") as weights:
                    weights.keys()
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except Exception as err:
            return path.name, str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def unused_name(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`, ... where an earlier one is taken (a damaged copy from an earlier incident)."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def set_aside(checkpoint: Path, why: str) -> Path:
    """Keep a checkpoint a resume must not start from as `<why>-checkpoint-N`: out of the resume's way, not deleted."""
    kept = unused_name(checkpoint.with_name(f"{why}-{checkpoint.name}"))
    os.replace(checkpoint, kept)
    logger.warning("kept the %s %s as %s", why, checkpoint.name, kept)
    return kept


def newest_loadable_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files all read back; newer damaged ones are set aside, never deleted."""
    damaged = []
    for checkpoint in reversed(complete_checkpoints(output_dir)):
        problem = damaged_file(checkpoint)
        if problem is None:
            for bad in damaged:  # resuming here would save over them: keep them under another name
                set_aside(bad, "damaged")
            return checkpoint
        logger.warning("%s cannot be loaded: %s is damaged (%s); trying the previous checkpoint", checkpoint, *problem)
        damaged.append(checkpoint)
    if damaged:
        raise UserError(
            f"no checkpoint in {output_dir} can be loaded ({', '.join(p.name for p in damaged)} damaged, see the "
            "warnings above); to start over pass `--overwrite_output_dir true` (deletes that folder) or choose "
            "another output_dir"
        )
    return None


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """The training-relevant keys whose values differ; locations and logging (NOT_THE_RECIPE) do not count."""
    keys = (saved.keys() | current.keys()) - NOT_THE_RECIPE
    return sorted(key for key in keys if saved.get(key) != current.get(key))


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
        if path.name == LOCK_FILE:  # held by this run
            continue
        logger.warning("overwrite_output_dir: deleting %s", path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def checkpoint_to_resume(output_dir: str, resolved_recipe: dict, overwrite: bool) -> str | None:
    """Decide how a run starts in `output_dir`: fresh, resumed from its newest complete checkpoint, or refused.

    A folder holding a finished run, or an unfinished one of another recipe, is never reused silently: the
    user must pass `--overwrite_output_dir true` (which deletes it) or pick another folder.
    """
    folder = Path(output_dir)
    if not folder.is_dir() or not any(path.name != LOCK_FILE for path in folder.iterdir()):
        return None
    if overwrite:
        clear_earlier_run(folder)
        return None
    recipe_path = folder / RECIPE_FILE
    saved = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() else None
    if (folder / FINISHED_MARKER).is_file():
        what = "a different recipe" if saved is None or recipe_differences(saved, resolved_recipe) else "this recipe"
        raise UserError(
            f"{output_dir} already holds a finished run of {what}; choose another output_dir or pass "
            "`--overwrite_output_dir true` to delete it and train again"
        )
    if saved is not None and recipe_differences(saved, resolved_recipe):
        raise UserError(
            f"{output_dir} holds an unfinished run of a different recipe (differs in: "
            f"{', '.join(recipe_differences(saved, resolved_recipe))}); rerun with that recipe to resume it, "
            "choose another output_dir, or pass `--overwrite_output_dir true` to delete it"
        )
    checkpoint = newest_loadable_checkpoint(folder)
    if checkpoint is None:
        return None
    logger.warning("resuming from %s (the newest loadable checkpoint in %s)", checkpoint, output_dir)
    return str(checkpoint)


class StopOnSignal(TrainerCallback):
    """On SIGTERM/SIGINT finish the current step, save a checkpoint and stop, on every rank at the same step.

    A rank that got the signal sets accelerate's trigger; every rank checks it (an all-reduce) after each step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received: int | None = None  # the signal this process got, if any
        self.stopped = False  # True once any rank got one: every rank then stops at the same step
        self.previous = {sig: signal.signal(sig, self._receive) for sig in self.SIGNALS}

    def _receive(self, signum, frame):
        if self.received is None:
            name = signal.Signals(signum).name
            logger.warning("received %s: saving a checkpoint after this step, then stopping", name)
        self.received = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            self.accelerator.set_trigger()
        if self.accelerator.check_trigger():
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
    write_atomically(output_dir / FINISHED_MARKER, json.dumps(summary, indent=2))
