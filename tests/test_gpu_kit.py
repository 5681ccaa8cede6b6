"""The GPU kit (benchmarks/gpu_kit.py): its wheels trimmed with a true RECORD, and its one command run here, on the
CPU, with the kit built for this Python, so that what a GPU machine runs cannot rot while no GPU is at hand."""

import json
import subprocess
import sys
import zipfile

import pytest
from helpers import run_command

from benchmarks.gpu_kit import COMMAND_LIMIT, record_line, trim


def test_a_trimmed_wheel_leaves_out_the_patterns_and_records_what_it_keeps(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    files = {"pkg/__init__.py": b"x = 1\n", "pkg/libbig_cuda118.so": b"\0" * 5000, "pkg/tests/test_a.py": b"1\n"}
    with zipfile.ZipFile(wheel, "w") as out:
        for name, data in files.items():
            out.writestr(name, data)
        out.writestr("pkg-1.0.dist-info/RECORD", "".join(f"{record_line(n, d)}\n" for n, d in files.items()))
    assert trim(wheel, ("pkg/libbig_cuda1*", "pkg/tests/*")) > 0
    with zipfile.ZipFile(wheel) as kept:
        assert sorted(kept.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py"]
        record = kept.read("pkg-1.0.dist-info/RECORD").decode().splitlines()
    assert record == [record_line("pkg/__init__.py", b"x = 1\n"), "pkg-1.0.dist-info/RECORD,,"]


@pytest.mark.slow
def test_the_kits_command_runs_gpu_checks_cpu_form(tiny_model, tmp_path):
    """The kit for this Python (three of its wheels: enough to show they are the ones imported), then the very
    command a GPU machine runs: install with --no-index --target, preflight, tiny model, gpu-check."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "dill==0.4.1", "-d", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode:
        pytest.skip(f"PyPI is not reachable: {probe.stderr.strip().splitlines()[-1:]}")
    kit = tmp_path / "kit"
    built = run_command(
        [sys.executable, "-m", "benchmarks.gpu_kit", "--for-this-machine", "--only", "trl,dill,datasets"]
        + ["--output", str(kit), "--budget_s", "500"]
    )
    assert built.returncode == 0, built.stderr[-2000:]
    command = (kit / "command.sh").read_text()
    assert len(command) < COMMAND_LIMIT and "--no-index --no-deps --target" in command
    report = json.loads((kit / "kit.json").read_text())
    assert sorted(w.split("-")[0] for w in report["wheels"]) == ["datasets", "dill", "trl"] and report["total_mb"] < 64
    out = tmp_path / "out"
    env = {"OUT": str(out), "TMPDIR": str(tmp_path), "GPU_CHECK_ARGS": "--steps two_processes,benchmark_rows"}
    done = run_command(["bash", "-c", command], env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    preflight = json.loads((out / "preflight.json").read_text())
    assert str(tmp_path / "gpu-kit" / "site-packages") in preflight["trl"]  # the kit's trl, not the virtualenv's
    assert preflight["datasets_map"] == "ok"
    assert preflight["nf4_forward_backward"] == "ok" and "libbitsandbytes" in preflight["bitsandbytes_library"]
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert steps["benchmark_rows"]["status"] == "ok" and steps["two_processes"]["status"] == "skipped"
    timeline = (out / "timeline.txt").read_text()
    assert all(step in timeline for step in ("install", "preflight", "tiny-model", "gpu-check", "done"))
