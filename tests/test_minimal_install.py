"""A minimal install trains, and a source checkout runs without installing the project.

The interpreter here sees the dependencies but not the project (no editable install) and, for the training run, not
the packages that only evaluation, serving, tracking and plotting need (pyproject.toml's extras).
"""

import json
import subprocess

import pytest
from helpers import ROOT, interpreter_without

pytestmark = pytest.mark.slow

EXTRAS_ONLY = ("wandb", "evaluate", "fastapi", "uvicorn", "matplotlib", "sacrebleu")


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory, tiny_model):
    return interpreter_without(tmp_path_factory.mktemp("bare"), EXTRAS_ONLY)


def run_in(python, args: list[str], cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_interpreter_sees_neither_the_project_nor_the_extras(bare_python, tmp_path):
    for module in ("sft", *EXTRAS_ONLY):
        found = run_in(bare_python, ["-c", f"import {module}"], cwd=tmp_path)
        assert found.returncode != 0 and "ModuleNotFoundError" in found.stderr, module
    assert run_in(bare_python, ["-c", "import trl, peft, datasets, bitsandbytes"], cwd=tmp_path).returncode == 0


def test_a_source_checkout_plans_with_each_entry_point(bare_python):
    for args in (
        ["sft/run.py", "--config", "recipes/smoke.yaml", "--dry_run", "true"],
        ["-m", "sft", "plan", "--config", "recipes/smoke.yaml"],
        ["-m", "sft.run", "--config", "recipes/smoke.yaml", "--dry_run", "true"],
    ):
        done = run_in(bare_python, args)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        assert "attn_implementation" in done.stdout + done.stderr


def test_accelerate_launch_trains_without_the_extras_or_the_project_installed(bare_python, tmp_path):
    launch = ["-m", "accelerate.commands.launch", "--quiet", "--config_file", "accelerate_configs/single_gpu.yaml"]
    run = ["sft/run.py", "--config", "recipes/smoke.yaml", "--max_steps", "2", "--eval_strategy", "no"]
    out = tmp_path / "out"
    done = run_in(bare_python, [*launch, *run, "--output_dir", str(out), "--processed_dir", str(tmp_path / "data")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 2
