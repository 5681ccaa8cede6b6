"""Test helpers shared by the test modules: paths, and running the project's commands as a user would."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
TINY_MODEL = ROOT / "build" / "tiny-llama"
SMOKE_RECIPE = ROOT / "recipes" / "smoke.yaml"
BIN = Path(sys.executable).parent
LAUNCH = ["accelerate", "launch", "--quiet", "--config_file", "accelerate_configs/single_gpu.yaml", "sft/run.py"]


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


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not ended within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def reply_tokens(messages: list[dict], tokenizer, max_length: int | None = None, last_only: bool = False) -> int:
    """Tokens of the replies and their end tokens, found in the rendered text by character offsets (not by any
    mask the code under test computes), among the first `max_length` tokens; with `last_only`, of the last reply."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, at = [], 0
    for message in messages:
        if message["role"] == "assistant":
            reply = f" {message['content'].strip()} {tokenizer.eos_token}"
            at = text.index(reply, at) + len(reply)
            spans.append((at - len(reply), at))
    spans = spans[-1:] if last_only else spans
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return sum(any(start <= begin < end for start, end in spans) for begin, _ in offsets[:max_length])


def interpreter_without(folder: Path, distributions: tuple[str, ...] = ()) -> Path:
    """A Python in `folder` that sees this virtualenv's packages but neither the project (no editable install)
    nor `distributions`: a fresh venv whose one .pth names a folder of links to the other installed entries."""
    import importlib.metadata
    import sysconfig
    import venv

    site = Path(sysconfig.get_paths()["purelib"])
    left_out = {"lccc_sft", "lccc-sft", *distributions}
    hidden = set()
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"] and dist.metadata["Name"].lower().replace("-", "_") in {
            name.lower().replace("-", "_") for name in left_out
        }:
            hidden |= {Path(file).parts[0] for file in dist.files or []}
    visible = folder / "site"
    visible.mkdir(parents=True)
    for entry in site.iterdir():
        if entry.name not in hidden and entry.suffix != ".pth" and not entry.name.startswith("__editable__"):
            (visible / entry.name).symlink_to(entry)
    venv.create(folder / "venv", with_pip=False)
    python = folder / "venv" / "bin" / "python"
    own_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(own_site) / "installed.pth").write_text(f"{visible}\n")
    return python


def fake_gpus(monkeypatch, count: int, capability: tuple[int, int], name: str = "NVIDIA A100-SXM4-80GB") -> list[int]:
    """Make torch report `count` GPUs of one kind; returns the device indices asked about, in order."""
    import torch

    asked: list[int] = []
    props = SimpleNamespace(name=name, total_memory=80 * 10**9, major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: asked.append(index) or props)
    return asked
