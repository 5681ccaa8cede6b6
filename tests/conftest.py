"""Shared fixtures: the shared LCCC sample, the tiny smoke model, one real smoke run and a server on it."""

import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import LAUNCH, SHARED, TINY_MODEL, free_port, run_command, start_command, stop_process, wait_for


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the shared LCCC sample and reference template are not available")
    return SHARED


@pytest.fixture(scope="session")
def toy_data(shared_dir) -> Path:
    return shared_dir / "lccc" / "toy_data.json"


@pytest.fixture(params=["shipped", "shared"], scope="session")
def lccc_file(request) -> Path:
    """A real LCCC-format file: the sample shipped in sft/assets, and as an extra ../shared's toy data."""
    if request.param == "shipped":
        from sft.tiny import SAMPLE_DATA

        return SAMPLE_DATA
    return request.getfixturevalue("toy_data")


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
    from sft.common.inference import read_run

    return read_run(str(smoke_run)).load_tokenizer()


@pytest.fixture(scope="session")
def trained_model(smoke_run):
    """The smoke run's 4-bit base plus adapter on the CPU, loaded as `make eval` and `make chat` load it."""
    from sft.common.inference import load_model, read_run

    return load_model(read_run(str(smoke_run)), device="cpu")


@dataclass
class Server:
    """A running `lccc-sft serve` on the smoke run: its address, API key, model ids and log file."""

    url: str
    api_key: str
    tuned: str
    base: str
    log: Path
    process: subprocess.Popen


@contextmanager
def running_server(model_path: Path, log: Path, *args: str):
    """`lccc-sft serve` on `model_path` on a free port of 127.0.0.1 with an API key, until the block ends."""
    import httpx

    port, api_key = free_port(), "test-key-1d7f2c"
    command = [sys.executable, "-m", "sft", "serve", "--model_path", str(model_path), "--port", str(port), *args]
    process = start_command(command, log, env={"SFT_API_KEY": api_key})
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=5).is_success
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, process, timeout=300)
        name = Path(model_path).name
        yield Server(url=url, api_key=api_key, tuned=name, base=f"{name}-base", log=log, process=process)
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def server(smoke_run, tmp_path_factory):
    """`lccc-sft serve` on the smoke run (the fine-tuned model and its base)."""
    with running_server(smoke_run, tmp_path_factory.mktemp("serve") / "serve.log") as running:
        yield running


@pytest.fixture(scope="session")
def tiny_server(tiny_model, tmp_path_factory):
    """`lccc-sft serve` on the smoke model itself (one model, `tiny-llama`): no training run needed."""
    with running_server(tiny_model, tmp_path_factory.mktemp("serve-tiny") / "serve.log") as running:
        yield running


# Fixtures that train or serve: a test that uses one belongs to the slow tier even where its mark was forgotten.
HEAVY_FIXTURES = {"smoke_run", "trained_model", "trained_tokenizer", "server", "tiny_server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
