"""Faults of the machine: a full disk, damaged files, two runs in one folder, a moved run folder (README's
"Interruptions, resume and safety"). Each loses nothing and ends with one line saying what happened."""

import errno
import json
import logging
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, run_command, start_command, wait_for

from sft.common.config import DataArguments
from sft.common.errors import UserError
from sft.common.files import is_disk_full, write_atomically
from sft.data import load_conversations, prepared_folder
from sft.train.checkpoints import checkpoint_to_resume, checkpoints, latest_complete_checkpoint

RUN = ["python", "sft/run.py", "--config", "recipes/smoke.yaml", "--eval_strategy", "no", "--logging_steps", "1"]


class SmallDisk:
    """A tmpfs of a chosen size at `path` (a real file system that fills up), unmounted after the test."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()}); see the ENOSPC test")

    def grow(self, size: str) -> None:
        """Free space, as a user would by deleting files: remount the same file system bigger."""
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "--lazy", str(self.path)], check=True)


@pytest.fixture
def small_disk(request, tmp_path):
    disk = SmallDisk(tmp_path / "disk", request.param)
    yield disk
    disk.unmount()


def error_line(result) -> str:
    """The one `error:` line a failed command printed (and no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def disk_full_error(command: list[str], folder: Path) -> str:
    """Run `command`, which must fail for a full disk under `folder`; its error line."""
    result = run_command(command)
    assert result.returncode == 2, result.stderr[-3000:]
    error = error_line(result)
    assert error.startswith(f"error: disk full while writing to {folder} (")
    return error


def finished_after_space_is_freed(small_disk, command: list[str], output_dir: Path) -> dict:
    """Free space, run `command` again: it must finish; its run summary."""
    small_disk.grow("8m")
    result = run_command(command)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"log": result.stderr, **json.loads((output_dir / "run_summary.json").read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["1100k"], indirect=True)  # a smoke checkpoint takes ~0.7 MB: one fits
def test_a_full_disk_while_saving_a_checkpoint_says_so_and_a_rerun_with_space_finishes(tiny_model, small_disk):
    output_dir = small_disk.path / "out"
    command = [*RUN, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(output_dir)]
    error = disk_full_error(command, output_dir)
    assert "MB free); a checkpoint here takes about 0.7 MB;" in error
    assert "it resumes from checkpoint-2" in error
    assert (output_dir / "checkpoint-4").is_dir(), "the failed save was not the second checkpoint"
    assert latest_complete_checkpoint(output_dir).name == "checkpoint-2", "a half-written checkpoint was taken"
    assert not (output_dir / "run_summary.json").exists()

    second = finished_after_space_is_freed(small_disk, command, output_dir)
    assert f"resuming from {output_dir / 'checkpoint-2'}" in second["log"] and second["global_step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["160k"], indirect=True)  # the recipe fits, the ~0.3 MB adapter does not
def test_a_full_disk_during_the_final_save_leaves_the_run_unfinished_until_a_rerun(tiny_model, small_disk):
    output_dir = small_disk.path / "out"
    command = [*RUN, "--max_steps", "2", "--save_strategy", "no", "--output_dir", str(output_dir)]
    error = disk_full_error(command, output_dir)
    assert "no checkpoint is complete yet, so it starts over" in error
    assert not (output_dir / "run_summary.json").exists() and not (output_dir / "adapter_model.safetensors").exists()

    assert finished_after_space_is_freed(small_disk, command, output_dir)["global_step"] == 2
    assert not (output_dir / ".final-save").exists()


def test_a_write_that_hits_enospc_is_reported_and_leaves_the_old_file(tmp_path, monkeypatch):
    """The same fault injected at the file layer, for machines that cannot mount a small file system."""
    target = tmp_path / "run_summary.json"
    target.write_text("earlier")
    real_write_text = Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(UserError, match=f"^disk full while writing to {tmp_path} \\(.* free\\); free some"):
        write_atomically(target, json.dumps({"global_step": 4}))
    monkeypatch.undo()
    assert target.read_text() == "earlier"
    assert [path.name for path in tmp_path.iterdir()] == ["run_summary.json"]


def unfinished_copy(smoke_run: Path, folder: Path) -> Path:
    """The smoke run copied elsewhere, as if it had died after its last checkpoint (no finished marker)."""
    shutil.copytree(smoke_run, folder)
    (folder / "run_summary.json").unlink()
    return folder


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_kept_and_the_moved_run_resumes_from_the_previous_one(smoke_run, tmp_path):
    run = unfinished_copy(smoke_run, tmp_path / "moved")  # another output_dir than the recipe.yaml inside says
    older, newest = checkpoints(run)[-2:]
    cut_short(newest / "optimizer.pt")
    result = run_command(["python", "sft/run.py", "--config", "recipes/smoke.yaml", "--output_dir", str(run)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{newest} cannot be loaded: optimizer.pt is damaged" in result.stderr
    assert f"resuming from {older} " in result.stderr
    kept = run / f"damaged-{newest.name}" / "optimizer.pt"
    assert kept.stat().st_size == 1000, "the damaged checkpoint was not kept as it was"
    finished = json.loads((smoke_run / "run_summary.json").read_text())["global_step"]
    assert json.loads((run / "run_summary.json").read_text())["global_step"] == finished


@pytest.mark.slow
def test_with_no_loadable_checkpoint_the_run_says_how_to_start_over_and_deletes_nothing(smoke_run, tmp_path):
    run = unfinished_copy(smoke_run, tmp_path / "run")
    for checkpoint in checkpoints(run):
        cut_short(checkpoint / "adapter_model.safetensors")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    before = sorted(path.relative_to(run) for path in run.rglob("*"))
    with pytest.raises(UserError, match="no checkpoint in .* can be loaded .*--overwrite_output_dir true"):
        checkpoint_to_resume(str(run), recipe, overwrite=False)
    assert sorted(path.relative_to(run) for path in run.rglob("*")) == before


def test_locations_and_logging_do_not_make_another_recipe(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoint-10" / "trainer_state.json").write_text("{}")
    saved = {"lora_r": 8, "output_dir": "/old/place", "processed_dir": "data/processed", "logging_steps": 5}
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    moved = {"lora_r": 8, "output_dir": str(run), "processed_dir": "/scratch/cache", "report_to": ["none"]}
    assert checkpoint_to_resume(str(run), moved, overwrite=False) == str(run / "checkpoint-10")
    with pytest.raises(UserError, match=r"differs in: lora_r\)"):
        checkpoint_to_resume(str(run), {**moved, "lora_r": 16}, overwrite=False)


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_stops_and_a_killed_runs_lock_does_not_block(tiny_model, tmp_path):
    output_dir = tmp_path / "out"
    log = tmp_path / "first.log"
    first = start_command([*RUN, "--max_steps", "5000", "--save_steps", "5000", "--output_dir", str(output_dir)], log)
    wait_for(lambda: "'loss':" in log.read_text(), first)
    second = run_command([*RUN, "--max_steps", "2", "--output_dir", str(output_dir)])
    assert second.returncode == 2
    assert error_line(second).startswith(f"error: {output_dir} is in use by another run (pid {first.pid} on ")
    assert first.poll() is None, "the second run disturbed the first"

    first.send_signal(signal.SIGKILL)
    first.wait()
    assert f"pid {first.pid} " in (output_dir / ".run.lock").read_text()  # the killed run's lock file stays
    third = run_command([*RUN, "--max_steps", "2", "--output_dir", str(output_dir), "--overwrite_output_dir", "true"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads((output_dir / "run_summary.json").read_text())["global_step"] == 2


def sample_data(processed_dir: Path) -> DataArguments:
    source = ROOT / "sft" / "assets" / "lccc_sample.json"
    return DataArguments(dataset_name=str(source), processed_dir=str(processed_dir))


def test_a_damaged_prepared_dataset_is_found_before_training_and_prepared_again(tmp_path, caplog):
    args = sample_data(tmp_path / "processed")
    first = load_conversations(args, seed=42)
    rows = first["train"].to_list()
    folder = prepared_folder(args, 42)
    turns = list(first["train"].map(lambda sample: {"n": len(sample["messages"])})["n"])  # cached, as tokenizing
    del first  # (its files are memory-mapped: damage them as another run would find them, not under our feet)
    [cache] = folder.glob("cache-*.arrow")
    cut_short(folder / "train.arrow")
    cut_short(cache)

    with caplog.at_level(logging.WARNING):
        again = load_conversations(args, seed=42)
    assert f"the prepared data in {folder} cannot be read" in caplog.text
    assert f"the tokenization cache {cache} is damaged" in caplog.text and not cache.exists()
    assert again["train"].to_list() == rows
    assert list(again["train"].map(lambda sample: {"n": len(sample["messages"])})["n"]) == turns


@pytest.mark.parametrize("small_disk", ["64k"], indirect=True)  # the sample's prepared data takes ~0.3 MB
def test_a_full_disk_while_preparing_data_leaves_no_half_written_cache(small_disk):
    args = sample_data(small_disk.path / "processed")
    with pytest.raises(UserError, match=f"^disk full while writing to {small_disk.path / 'processed'} \\("):
        load_conversations(args, seed=42)
    assert [path.name for path in (small_disk.path / "processed").iterdir() if not path.name.endswith(".lock")] == []
    small_disk.grow("8m")
    assert len(load_conversations(args, seed=42)["train"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["1m"], indirect=True)  # the merged tiny model takes ~5 MB
def test_a_full_disk_while_merging_leaves_no_merged_folder(smoke_run, small_disk):
    output_dir = small_disk.path / "merged"
    merge = ["python", "-m", "sft", "merge", "--model_path", str(smoke_run), "--output_dir", str(output_dir)]
    disk_full_error(merge, small_disk.path)
    assert list(small_disk.path.iterdir()) == [], "a half-written merge was left behind"


def test_only_failed_writes_count_as_a_full_disk(tmp_path, monkeypatch):
    """On a nearly full disk torch's lost-errno write error is a full disk; a bug or a CUDA error is not."""
    torch_write_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr("sft.common.files.free_bytes", lambda folder: 0)
    assert is_disk_full(torch_write_error, tmp_path)
    assert is_disk_full(OSError(errno.EIO, "Input/output error"), tmp_path)
    assert not is_disk_full(ValueError("a bug"), tmp_path)
    assert not is_disk_full(RuntimeError("CUDA error: an illegal memory access was encountered"), tmp_path)
    monkeypatch.setattr("sft.common.files.free_bytes", lambda folder: 2**40)
    assert not is_disk_full(torch_write_error, tmp_path)
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
