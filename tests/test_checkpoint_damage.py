"""Damage a resume must find: a checkpoint damaged again after an earlier incident, bytes flipped inside a stored
record of `optimizer.pt`, and a prepared split cut exactly at a record-batch boundary."""

import json
import zipfile

import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import save_file

from sft.data.cache import is_readable
from sft.train.checkpoints import checkpoint_to_resume, damaged_file

RECIPE = {"lora_r": 8, "seed": 1}


def write_checkpoint(folder, step: int):
    """A checkpoint as Trainer writes one: optimizer state (torch.save's zip), then trainer_state.json last."""
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    torch.save({"state": {0: {"exp_avg": torch.arange(4096, dtype=torch.float32)}}}, checkpoint / "optimizer.pt")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


def flip_bytes_inside_the_largest_record(path) -> None:
    """Same length, same zip structure: only bytes in the middle of the tensor's stored data change."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
        assert record.compress_type == zipfile.ZIP_STORED
    data = bytearray(path.read_bytes())
    with open(path, "rb") as raw:  # where the record's data starts: after its local header, name and extra field
        raw.seek(record.header_offset + 26)
        name_length, extra_length = (int.from_bytes(raw.read(2), "little") for _ in range(2))
    middle = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    path.write_bytes(data)
    assert len(data) == path.stat().st_size


def run_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    return folder


def test_bytes_flipped_inside_a_stored_optimizer_record_are_found_and_the_run_falls_back(tmp_path):
    folder = run_folder(tmp_path)
    write_checkpoint(folder, 10)
    newest = write_checkpoint(folder, 20)
    assert damaged_file(newest) is None
    flip_bytes_inside_the_largest_record(newest / "optimizer.pt")
    assert damaged_file(newest)[0] == "optimizer.pt"
    assert checkpoint_to_resume(str(folder), RECIPE, overwrite=False) == str(folder / "checkpoint-10")
    assert (folder / "damaged-checkpoint-20" / "optimizer.pt").is_file()


def test_a_checkpoint_damaged_a_second_time_gets_its_own_name_and_the_resume_goes_on(tmp_path):
    folder = run_folder(tmp_path)
    write_checkpoint(folder, 10)
    for incident in (1, 2, 3):
        newest = write_checkpoint(folder, 20)  # the resumed run saves step 20 again, and it is damaged again
        (newest / "trainer_state.json").write_text(json.dumps({"incident": incident}))
        flip_bytes_inside_the_largest_record(newest / "optimizer.pt")
        assert checkpoint_to_resume(str(folder), RECIPE, overwrite=False) == str(folder / "checkpoint-10")
    kept = ["damaged-checkpoint-20", "damaged-checkpoint-20.2", "damaged-checkpoint-20.3"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("damaged-")) == kept
    incidents = [json.loads((folder / name / "trainer_state.json").read_text())["incident"] for name in kept]
    assert incidents == [1, 2, 3]  # no earlier copy was overwritten


def write_arrow_stream(path, batches: list[pa.RecordBatch]) -> list[int]:
    """An Arrow stream file as `datasets` writes splits; returns the file offset after each record batch."""
    ends = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
            ends.append(sink.tell())
    return ends


def test_a_split_cut_exactly_at_a_record_batch_boundary_is_not_readable(tmp_path):
    """Such a file reads back without any error, just with fewer rows: only the row count tells."""
    batches = [pa.record_batch({"text": [f"row {i}-{j}" for j in range(5)]}) for i in range(3)]
    ends = write_arrow_stream(tmp_path / "train.arrow", batches)
    (tmp_path / "stats.json").write_text(json.dumps({"samples": {"train": 15}}))
    assert is_readable(tmp_path)
    with open(tmp_path / "train.arrow", "r+b") as file:
        file.truncate(ends[1])
    with pa.memory_map(str(tmp_path / "train.arrow")) as source:
        assert pa.ipc.open_stream(source).read_all().num_rows == 10  # no error: the cut is invisible to Arrow
    assert not is_readable(tmp_path)


def truncated(path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "name, damage, why",
    [
        ("optimizer.pt", flip_bytes_inside_the_largest_record, "fails its checksum"),
        ("rng_state.pth", flip_bytes_inside_the_largest_record, "fails its checksum"),
        ("training_args.bin", truncated, "File is not a zip file"),
        ("adapter_model.safetensors", truncated, "incomplete metadata, file not fully covered"),
        ("trainer_state.json", truncated, "Unterminated string"),
    ],
)
def test_every_kind_of_checkpoint_file_is_read_back_whole(tmp_path, name, damage, why):
    checkpoint = write_checkpoint(tmp_path, 5)
    path = checkpoint / name
    if path.suffix in (".pt", ".pth", ".bin"):
        torch.save({"weights": torch.arange(4096, dtype=torch.float32)}, path)
    elif path.suffix == ".safetensors":
        save_file({"lora_B": torch.ones(64, 64)}, path)
    else:
        path.write_text(json.dumps({"global_step": 5, "log_history": ["a" * 200]}), encoding="utf-8")
    (checkpoint / "README.md").write_text("{ not JSON, and not read")  # other files are not checked
    assert damaged_file(checkpoint) is None
    damage(path)
    found, reason = damaged_file(checkpoint)
    assert found == name and why in reason and "\n" not in reason


def test_a_damaged_file_whose_error_has_no_message_is_named_by_the_errors_kind(tmp_path, monkeypatch):
    checkpoint = write_checkpoint(tmp_path, 5)
    monkeypatch.setattr(json, "loads", lambda text: (_ for _ in ()).throw(EOFError()))
    assert damaged_file(checkpoint) == ("trainer_state.json", "EOFError")
