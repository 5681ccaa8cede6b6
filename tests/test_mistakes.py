"""The sweep: every command with ordinary bad inputs ends in one `error:` line, exit code 2 (130 for Ctrl-C), no
traceback, nothing loaded and nothing damaged.

Each case runs the command's `main(argv)` in-process through `lccc-sft`'s entry point (the same wrapper a shell
gets); loading a model is forbidden for the whole sweep, so a check that comes too late fails the case. A few
cases per kind also run as real processes (marked slow). docs/reliability.md reports the sweep's size.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from helpers import ROOT, SMOKE_RECIPE, run_command, start_command
from safetensors.torch import save_file

from sft.cli import main
from sft.common.errors import INTERRUPTED_EXIT

ADAPTER = "adapter_model.safetensors"


class ReachedModelLoading(AssertionError):
    """A bad input went as far as loading a model: its check comes too late."""


def fake_run(folder: Path, base: Path) -> Path:
    """A training output folder as read_run sees it: adapter config naming `base`, adapter weights, recipe."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "peft_type": "LORA"}))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 2)}, str(folder / ADAPTER))
    shutil.copy(SMOKE_RECIPE, folder / "recipe.yaml")
    return folder


def mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    )


class Places:
    """The bad inputs of the sweep, made once: files where folders belong, damaged files, read-only storage."""

    def __init__(self, root: Path, tiny_model: Path):
        self.root = root
        self.base = root / "base-model"
        shutil.copytree(tiny_model, self.base)
        self.run = fake_run(root / "run", self.base)
        self.truncated = fake_run(root / "truncated-run", self.base)
        weights = self.truncated / ADAPTER
        weights.write_bytes(weights.read_bytes()[:-8])
        self.bad_adapter_config = fake_run(root / "bad-config-run", self.base)
        (self.bad_adapter_config / "adapter_config.json").write_text('{"base_model_name_or_path": ')
        self.file = root / "a-file"
        self.file.write_text("not a folder")
        self.empty = root / "empty-model"
        self.empty.mkdir()
        self.fifo = root / "recipe.fifo"
        os.mkfifo(self.fifo)
        self.binary = root / "binary.yaml"
        self.binary.write_bytes(bytes(range(256)))
        self.latin1 = root / "latin1.yaml"
        self.latin1.write_bytes("system_prompt: café\n".encode("latin-1"))
        self.infinite = root / "infinite.yaml"
        self.infinite.write_text(SMOKE_RECIPE.read_text() + "\nlearning_rate: .inf\n")
        self.broken_template = root / "broken.jinja"
        self.broken_template.write_text("{% for m in messages %}{% generation %}{{ m.content }{% endgeneration %}")
        self.plain_template = root / "plain.jinja"
        self.plain_template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
        self.parquet = root / "corrupt.parquet"
        self.parquet.write_bytes(b"PAR1" + b"\0" * 64)
        self.deep = root / "deep.json"
        self.deep.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
        self.processed = root / "processed"
        self.readonly = root / "readonly"  # a read-only file system holding a run (its folder is eval's default)
        self.mounted = mount_tmpfs(self.readonly, "size=8m")
        if self.mounted:
            fake_run(self.readonly / "run", self.base)
            subprocess.run(["mount", "-o", "remount,ro", str(self.readonly)], check=True)

    def digest(self) -> str:
        """A hash of every input the sweep could damage: the base model and the runs."""
        digest = hashlib.sha256()
        for folder in (self.base, self.run, self.truncated):
            for path in sorted(folder.rglob("*")):
                digest.update(str(path.relative_to(self.root)).encode())
                if path.is_file():
                    digest.update(path.read_bytes())
        return digest.hexdigest()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "--lazy", str(self.readonly)], check=True)


@pytest.fixture(scope="module")
def places(tiny_model, tmp_path_factory):
    made = Places(tmp_path_factory.mktemp("mistakes"), tiny_model)
    yield made
    made.close()


def uninstalled_tracker() -> str | None:
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    missing = [name for name in INTEGRATION_TO_CALLBACK if name not in get_available_reporting_integrations()]
    return missing[0] if missing else None


def smoke(*flags) -> list[str]:
    return ["--config", str(SMOKE_RECIPE), *flags]


# id: (command, arguments from the Places, what the error line says). `needs` below: what a case skips without.
MISTAKES = {
    # recipes and flags
    "recipe-binary": ("plan", lambda p: ["--config", str(p.binary)], "is not UTF-8 text"),
    "recipe-latin1": ("plan", lambda p: ["--config", str(p.latin1)], "is not UTF-8 text"),
    "recipe-fifo": ("plan", lambda p: ["--config", str(p.fifo)], "is not a regular file"),
    "recipe-missing": ("data", lambda p: ["--config", str(p.root / "nope.yaml")], "recipe file not found"),
    "config-twice": ("plan", lambda p: [*smoke(), "--config", str(SMOKE_RECIPE)], "--config is given twice"),
    "flag-twice": ("plan", lambda p: smoke("--lora_r", "4", "--lora_r", "8"), "--lora_r is given twice"),
    "flag-twice-eval": (
        "eval",
        lambda p: ["--model_path", str(p.run), "--split", "test", "--split", "validation"],
        "--split is given twice",
    ),
    "unknown-command": ("trian", lambda p: [], "did you mean `train`"),
    # numbers no run can use
    "recipe-infinite-lr": ("train", lambda p: ["--config", str(p.infinite)], "expected a finite number, got inf"),
    "flag-nan-lr": ("train", lambda p: smoke("--learning_rate=nan"), "expected a finite number, got nan"),
    "flag-inf-lora-dropout": ("train", lambda p: smoke("--lora_dropout", "inf"), "expected a finite number"),
    "chat-inf-temperature": ("chat", lambda p: ["--model_path", str(p.run), "--temperature", "inf"], "finite"),
    "serve-nan-top-p": ("serve", lambda p: ["--model_path", str(p.run), "--top_p", "nan"], "finite"),
    "negative-seed": ("train", lambda p: smoke("--seed=-1"), "`seed` must be zero or more"),
    "negative-data-seed": ("plan", lambda p: smoke("--data_seed=-2"), "`data_seed` must be zero or more"),
    "negative-seed-data": ("data", lambda p: smoke("--seed=-1"), "`seed` must be zero or more"),
    "negative-seed-eval": ("eval", lambda p: ["--model_path", str(p.run), "--seed=-1"], "`seed` must be zero"),
    "eval-batch-0": ("train", lambda p: smoke("--per_device_eval_batch_size", "0"), "per_device_eval_batch_size"),
    "save-steps": ("train", lambda p: smoke("--save_steps=-5"), "`save_steps` must be a positive number"),
    "eval-steps": ("train", lambda p: smoke("--eval_steps=-1"), "`eval_steps` must be a positive number"),
    "huge-max-length": ("train", lambda p: smoke("--max_length", "1000000000"), "the plan needs about"),
    "max-ppl-samples": ("eval", lambda p: ["--model_path", str(p.run), "--max_ppl_samples=-1"], "max_ppl_samples"),
    "knowledge-limit": ("eval", lambda p: ["--model_path", str(p.run), "--knowledge_limit", "0"], "knowledge_limit"),
    # values known before loading
    "unknown-attention": ("train", lambda p: smoke("--attn_implementation", "fastest"), "unknown attn_implementation"),
    "unknown-tracker": ("train", lambda p: smoke("--report_to", "nosuchtracker"), "unknown tracker"),
    "uninstalled-tracker": ("train", lambda p: smoke("--report_to", uninstalled_tracker()), "is not installed"),
    "missing-resume": (
        "train",
        lambda p: smoke("--resume_from_checkpoint", str(p.root / "checkpoint-9")),
        "resume_from_checkpoint",
    ),
    "empty-output-dir": ("train", lambda p: smoke("--output_dir", ""), "output_dir is empty"),
    "device-cuda": ("chat", lambda p: ["--model_path", str(p.run), "--device", "cuda"], "no CUDA GPU"),
    "device-typo": ("eval", lambda p: ["--model_path", str(p.run), "--device", "gpu0"], "use cpu, cuda or cuda:N"),
    "merge-device-cuda": ("merge", lambda p: ["--model_path", str(p.run), "--device", "cuda:0"], "no CUDA GPU"),
    "serve-port-high": ("serve", lambda p: ["--model_path", str(p.run), "--port", "70000"], "--port must be"),
    "serve-port-zero": ("serve", lambda p: ["--model_path", str(p.run), "--port", "0"], "--port must be"),
    "serve-empty-key": ("serve", lambda p: ["--model_path", str(p.run), "--api_key", ""], "--api_key is empty"),
    "serve-busy-port": ("serve", lambda p: ["--model_path", str(p.run), "--port", str(p.busy_port)], "cannot listen"),
    "serve-bad-host": (
        "serve",
        lambda p: ["--model_path", str(p.run), "--host", "no-such-host.invalid"],
        "cannot be resolved",
    ),
    # damage: writing into what another command reads
    "train-into-base": (
        "train",
        lambda p: smoke("--model_name_or_path", str(p.base), "--output_dir", str(p.base)),
        "must lie outside the base model's folder",
    ),
    "train-inside-base": (
        "train",
        lambda p: smoke("--model_name_or_path", str(p.base), "--output_dir", str(p.base / "run")),
        "must lie outside the base model's folder",
    ),
    "merge-into-run": (
        "merge",
        lambda p: ["--model_path", str(p.run), "--output_dir", str(p.run)],
        "must lie outside --model_path",
    ),
    "merge-inside-run": (
        "merge",
        lambda p: ["--model_path", str(p.run), "--output_dir", str(p.run / "merged")],
        "must lie outside --model_path",
    ),
    "export-into-run": (
        "export-gguf",
        lambda p: ["--model_path", str(p.run), "--output_dir", str(p.run)],
        "must lie outside --model_path",
    ),
    # output places that cannot be used
    "train-output-file": ("train", lambda p: smoke("--output_dir", str(p.file)), "it is a file, not a folder"),
    "train-output-under-file": ("train", lambda p: smoke("--output_dir", str(p.file / "out")), "is a file"),
    "train-output-readonly": ("train", lambda p: smoke("--output_dir", str(p.readonly / "out")), "Read-only"),
    "plan-output-readonly": ("plan", lambda p: smoke("--output_dir", str(p.readonly / "out")), "Read-only"),
    "eval-output-file": ("eval", lambda p: ["--model_path", str(p.run), "--output_dir", str(p.file)], "is a file"),
    "eval-output-under-file": (
        "eval",
        lambda p: ["--model_path", str(p.run), "--output_dir", str(p.file / "r")],
        "is a file",
    ),
    "eval-output-readonly": (
        "eval",
        lambda p: ["--model_path", str(p.run), "--output_dir", str(p.readonly / "r")],
        "Read-only",
    ),
    "eval-default-output-readonly": ("eval", lambda p: ["--model_path", str(p.readonly / "run")], "Read-only"),
    "eval-save-generation-readonly": (
        "eval",
        lambda p: [
            "--model_path",
            str(p.readonly / "run"),
            "--output_dir",
            str(p.root / "report"),
            "--save_generation_config",
            "true",
        ],
        "Read-only",
    ),
    "merge-output-file": ("merge", lambda p: ["--model_path", str(p.run), "--output_dir", str(p.file)], "is a file"),
    "merge-output-under-file": (
        "merge",
        lambda p: ["--model_path", str(p.run), "--output_dir", str(p.file / "m")],
        "is a file",
    ),
    "merge-output-readonly": (
        "merge",
        lambda p: ["--model_path", str(p.run), "--output_dir", str(p.readonly / "m")],
        "Read-only",
    ),
    "export-output-file": (
        "export-gguf",
        lambda p: ["--model_path", str(p.run), "--output_dir", str(p.file)],
        "is a file",
    ),
    "export-output-readonly": (
        "export-gguf",
        lambda p: ["--model_path", str(p.run), "--output_dir", str(p.readonly / "g")],
        "Read-only",
    ),
    "data-output-file": ("data", lambda p: smoke("--output_dir", str(p.file)), "cannot use processed_dir"),
    "data-output-under-file": ("data", lambda p: smoke("--output_dir", str(p.file / "d")), "is a file"),
    "data-output-readonly": ("data", lambda p: smoke("--output_dir", str(p.readonly / "d")), "Read-only"),
    "train-processed-readonly": (
        "train",
        lambda p: smoke("--processed_dir", str(p.readonly / "d"), "--output_dir", str(p.root / "out-processed")),
        "Read-only",
    ),
    # files that are not what they claim
    "empty-model-folder": ("plan", lambda p: smoke("--model_name_or_path", str(p.empty)), "holds no model"),
    "run-as-base-model": ("train", lambda p: smoke("--model_name_or_path", str(p.run)), "is a training run"),
    "run-as-base-of-eval": (
        "eval",
        lambda p: ["--model_path", str(p.run), "--base_model", str(p.run)],
        "is a training run",
    ),
    "template-syntax": (
        "plan",
        lambda p: smoke("--chat_template_path", str(p.broken_template)),
        "is not a valid Jinja template: line 1",
    ),
    "template-no-markers": (  # no markers: spans are derived from it, but its replies end in no end-of-turn token
        "plan",
        lambda p: smoke("--chat_template_path", str(p.plain_template)),
        "ends a reply with no end-of-turn token",
    ),
    "corrupt-parquet": (
        "data",
        lambda p: smoke("--dataset_name", str(p.parquet), "--output_dir", str(p.processed)),
        "is not a readable parquet file",
    ),
    "deep-json": (
        "data",
        lambda p: smoke("--dataset_name", str(p.deep), "--output_dir", str(p.processed)),
        "nested too deeply",
    ),
    "truncated-adapter-chat": ("chat", lambda p: ["--model_path", str(p.truncated), "--message", "hi"], "is damaged"),
    "truncated-adapter-merge": ("merge", lambda p: ["--model_path", str(p.truncated)], "is damaged"),
    "truncated-adapter-serve": ("serve", lambda p: ["--model_path", str(p.truncated)], "is damaged"),
    "truncated-adapter-export": ("export-gguf", lambda p: ["--model_path", str(p.truncated)], "is damaged"),
    "truncated-adapter-eval": ("eval", lambda p: ["--model_path", str(p.truncated)], "is damaged"),
    "damaged-adapter-config": ("chat", lambda p: ["--model_path", str(p.bad_adapter_config)], "cannot be read"),
}
NEEDS = {
    "readonly": lambda p: p.mounted or pytest.skip("cannot mount a read-only tmpfs here (needs root)"),
    "cuda": lambda p: not torch.cuda.is_available() or pytest.skip("this machine has CUDA"),
    "tracker": lambda p: uninstalled_tracker() or pytest.skip("every tracker transformers knows is installed"),
}


def needs(case: str) -> list[str]:
    return [kind for kind in NEEDS if kind in case]


@pytest.fixture(autouse=True)
def quiet_handlers_of_earlier_tests(monkeypatch):
    """Libraries keep log handlers bound to the stderr pytest captured for an earlier test, closed since: their
    failure to write there is the harness's, not the command's, and must not read as a traceback here."""
    monkeypatch.setattr(logging, "raiseExceptions", False)


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise ReachedModelLoading("a model was loaded before the mistake was found")

    # every model class loads through PreTrainedModel.from_pretrained (TRL calls the architecture's class directly)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def busy_port(places):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        places.busy_port = taken.getsockname()[1]
        yield


def one_error_line(capsys, argv: list[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == code, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    return errors[0]


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_is_one_error_line_before_loading_and_damages_nothing(
    case, places, capsys, monkeypatch, no_model_loading, busy_port
):
    for kind in needs(case):
        NEEDS[kind](places)
    monkeypatch.chdir(ROOT)
    command, argv, expected = MISTAKES[case]
    before = places.digest()
    line = one_error_line(capsys, [command, *argv(places)])
    assert expected in line
    assert places.digest() == before


def test_an_empty_api_key_variable_is_refused(places, capsys, monkeypatch, no_model_loading):
    monkeypatch.setenv("SFT_API_KEY", "")
    assert "SFT_API_KEY is set but empty" in one_error_line(capsys, ["serve", "--model_path", str(places.run)])


def test_infinity_stays_allowed_where_it_means_something():
    from sft.common.config import parse_recipe

    assert parse_recipe(smoke("--max_grad_norm", "inf")).training.max_grad_norm == float("inf")


def test_ctrl_c_before_training_is_one_line_exit_130_and_leaves_no_output_folder(tmp_path, capsys, monkeypatch):
    import sft.train.trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft.train.trainer, "build_trainer", interrupted)  # as if Ctrl-C hit the model loading
    output_dir = tmp_path / "out"
    line = one_error_line(capsys, ["train", *smoke("--output_dir", str(output_dir))], code=INTERRUPTED_EXIT)
    assert line.startswith("error: interrupted")
    assert not output_dir.exists()  # no folder holding only .run.lock


def test_a_failure_before_training_leaves_no_folder_holding_only_the_lock(tmp_path, capsys):
    output_dir = tmp_path / "out"
    line = one_error_line(capsys, ["train", *smoke("--output_dir", str(output_dir), "--lora_target_modules", "qkv")])
    assert "name no module" in line
    assert not output_dir.exists()


def test_only_rank_0_prints_the_error(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as stopped:
        main(["plan", *smoke("--lora_r", "0")])
    assert stopped.value.code == 2
    assert "error:" not in capsys.readouterr().err


def test_merge_onto_read_only_storage_is_not_called_a_full_disk(tmp_path):
    import errno

    from sft.common.errors import UserError
    from sft.common.files import reporting_full_disk

    with pytest.raises(UserError, match="cannot write to .*: Read-only file system"):
        with reporting_full_disk(tmp_path):
            raise OSError(errno.EROFS, "Read-only file system")


# --- The same kinds as real processes, as a user's shell sees them. ---------------------------------------------


def error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["recipe-binary", "train-into-base", "truncated-adapter-serve", "eval-output-file", "deep-json"]
)
def test_as_a_process(case, places):
    command, argv, expected = MISTAKES[case]
    before = places.digest()
    result = run_command([sys.executable, "-m", "sft", command, *argv(places)], timeout=300)
    assert expected in error_line(result)
    assert places.digest() == before


@pytest.mark.slow
def test_a_busy_port_is_found_before_the_model_loads_in_a_process(places):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_command(
            [sys.executable, "-m", "sft", "serve", "--model_path", str(places.run), "--port", str(port)]
        )
    assert "cannot listen on 127.0.0.1" in error_line(result)
    assert "loading base model" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "content, expected",
    [
        ("compute_environment: LOCAL_MACHINE\ndistributed_type: NO\nbogus_key: 1\n", "unknown keys"),
        ("distributed_type: [NO\n", "is not valid YAML"),
        ("- NO\n", "must be a mapping"),
        (None, "not found"),
    ],
    ids=["unknown-key", "malformed", "not-a-mapping", "missing"],
)
def test_make_checks_the_accelerate_config_before_launching(tmp_path, content, expected):
    config = tmp_path / "launch.yaml"
    if content is not None:
        config.write_text(content)
    result = run_command(["make", "--no-print-directory", "plan", f"ACCELERATE_CONFIG={config}", f"VENV={sys.prefix}"])
    assert expected in error_line(result)  # make's own exit code for a failed step is 2 as well


@pytest.mark.slow
def test_ctrl_c_while_importing_is_one_line_and_exit_130(tmp_path):
    output_dir = tmp_path / "out"
    log = tmp_path / "log.txt"
    process = start_command([sys.executable, "-m", "sft", "train", *smoke("--output_dir", str(output_dir))], log)
    time.sleep(1.0)  # well inside the imports of torch/transformers (several seconds here)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == INTERRUPTED_EXIT
    text = log.read_text()
    assert "Traceback" not in text
    assert [line for line in text.splitlines() if line.startswith("error:")] == [
        "error: interrupted (Ctrl-C); nothing was finished or published"
    ]
    assert not output_dir.exists()


@pytest.mark.slow
def test_a_two_process_launch_prints_the_error_once(tmp_path):
    launch = ["accelerate", "launch", "--quiet", "--config_file", "accelerate_configs/cpu_2proc.yaml", "sft/run.py"]
    result = run_command([*launch, *smoke("--lora_r", "0")], timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("error: `lora_r` must be at least 1") == 1
