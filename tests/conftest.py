"""Shared fixtures: paths, the shared LCCC sample, the tiny smoke model, and a way to run commands."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
TINY_MODEL = ROOT / "build" / "tiny-llama"
SMOKE_RECIPE = ROOT / "recipes" / "smoke.yaml"
BIN = Path(sys.executable).parent
LAUNCH = ["accelerate", "launch", "--quiet", "--config_file", "accelerate_configs/single_gpu.yaml", "sft/run.py"]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the shared LCCC sample and reference template are not available")
    return SHARED


@pytest.fixture(scope="session")
def toy_data(shared_dir) -> Path:
    return shared_dir / "lccc" / "toy_data.json"


@pytest.fixture(scope="session")
def reference_template(shared_dir) -> str:
    return (shared_dir / "reference" / "llama2-chat.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The smoke model, built on first use exactly as `make tiny-model` builds it."""
    if not (TINY_MODEL / "config.json").exists():
        from sft.tiny import build_tiny_llama

        build_tiny_llama(str(TINY_MODEL))
    return TINY_MODEL


def command_env(env: dict | None = None) -> dict:
    """This process's environment with this virtualenv's tools first on PATH, plus `env`."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}


def run_command(
    args: list[str], env: dict | None = None, timeout: int = 600, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run a command from the repository root and wait for it; `input` is its standard input (else none)."""
    stdin = None if input is not None else subprocess.DEVNULL
    return subprocess.run(
        args, cwd=ROOT, env=command_env(env), capture_output=True, text=True, timeout=timeout, input=input, stdin=stdin
    )


def start_command(args: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a command from the repository root in the background, its output going to `log_path`."""
    log = open(log_path, "w")  # noqa: SIM115 - the child holds it until it exits
    return subprocess.Popen(args, cwd=ROOT, env=command_env(env), stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    """Poll `condition` while `process` runs; fail if it ends or the time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the awaited moment"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def smoke_run(tiny_model, tmp_path_factory) -> Path:
    """Output folder of one real smoke run (`accelerate launch sft/run.py --config recipes/smoke.yaml`)."""
    output_dir = tmp_path_factory.mktemp("smoke") / "out"
    result = run_command([*LAUNCH, "--config", "recipes/smoke.yaml", "--output_dir", str(output_dir)])
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="session")
def trained_tokenizer(smoke_run):
    """The smoke run's tokenizer, loaded as `make eval` and `make chat` load it."""
    from sft.inference import load_tokenizer, read_run

    return load_tokenizer(read_run(str(smoke_run)))


@pytest.fixture(scope="session")
def trained_model(smoke_run):
    """The smoke run's 4-bit base plus adapter on the CPU, loaded as `make eval` and `make chat` load it."""
    from sft.inference import load_model, read_run

    return load_model(read_run(str(smoke_run)), device="cpu")
