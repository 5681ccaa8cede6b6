"""gpu-check cut short: a total time budget, a choice of steps, the JSON rewritten after each step, and child runs
that do not depend on the caller's environment."""

import json
import os
import time

import pytest
from helpers import ROOT

from benchmarks import gpu_check


def test_gpu_check_keeps_its_budget_and_writes_each_step_as_it_ends(tmp_path, monkeypatch):
    """A spent budget skips the steps left, with the reason; the JSON on disk holds every step that ended."""
    output = tmp_path / "check.json"
    seen = []

    def first_step(*args):
        seen.append(json.loads(output.read_text())["steps"])  # what a kill now would leave
        time.sleep(1.5)
        return {"status": "ok"}

    monkeypatch.setattr(gpu_check, "sigterm_then_resume", first_step)
    monkeypatch.setattr(gpu_check, "SHORTEST_STEP_S", 1)
    steps = ["--steps", "sigterm_then_resume,benchmark_rows", "--budget_s", "2", "--output", str(output)]
    results = gpu_check.main(steps)
    assert seen == [{}] and results["steps"]["sigterm_then_resume"]["status"] == "ok"
    assert results["steps"]["benchmark_rows"] == {**results["steps"]["benchmark_rows"], "status": "skipped"}
    assert "time budget of 2 s is spent" in results["steps"]["benchmark_rows"]["reason"]
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    with pytest.raises(SystemExit):
        gpu_check.main(["--steps", "smoke_on_cuda,no_such_step"])


def test_gpu_check_children_get_unbuffered_output_and_the_checkout_whatever_the_caller_set(monkeypatch):
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = gpu_check.child_env()
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
