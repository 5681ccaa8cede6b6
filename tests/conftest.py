"""Shared fixtures: the shared LCCC sample, the tiny smoke model, and one real smoke run."""

from pathlib import Path

import pytest
from helpers import LAUNCH, SHARED, TINY_MODEL, run_command


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
    from sft.inference import read_run

    return read_run(str(smoke_run)).load_tokenizer()


@pytest.fixture(scope="session")
def trained_model(smoke_run):
    """The smoke run's 4-bit base plus adapter on the CPU, loaded as `make eval` and `make chat` load it."""
    from sft.inference import load_model, read_run

    return load_model(read_run(str(smoke_run)), device="cpu")
