"""Several processes: a real 2-process run on CPU (gloo), and the launch configurations and SLURM script."""

import json
import os
import signal
import stat
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import psutil
import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from helpers import LAUNCH, ROOT, run_command, start_command, wait_for

from sft.train.checkpoints import latest_complete_checkpoint

pytestmark = pytest.mark.slow  # every test here needs a training run, a server or a browser

CONFIGS = ROOT / "accelerate_configs"
TWO_PROCESSES = ["accelerate", "launch", "--quiet", "--config_file", "accelerate_configs/cpu_2proc.yaml", "sft/run.py"]
# 96 samples: 12 full batches of 8 on one process, 6 full batches of 8 on each of two (no partial last batch,
# which Accelerate would complete with samples from the epoch's start on one rank).
SHORT_RUN = [
    "--config",
    "recipes/smoke.yaml",
    "--num_train_epochs",
    "1",
    "--max_train_samples",
    "96",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
    "--log_level",
    "info",
    "--log_level_replica",
    "info",
]


@dataclass
class Run:
    output_dir: Path
    summary: dict
    log: str


# Imported first by every Python process of a run (PYTHONPATH): in rank 1 only, output_dir becomes read-only
# (its own mount namespace with a read-only bind mount), and a probe write records that it really is.
READ_ONLY_FOR_RANK_1 = """
import ctypes, os, pathlib
if os.environ.get("RANK") == "1":
    libc = ctypes.CDLL(None, use_errno=True)
    folder, report = os.environ["READ_ONLY_DIR"].encode(), pathlib.Path(os.environ["READ_ONLY_REPORT"])
    CLONE_NEWNS, MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20000, 0x1, 0x20, 0x1000, 0x4000, 0x40000
    for result in (
        libc.unshare(CLONE_NEWNS),
        libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None),
        libc.mount(folder, folder, None, MS_BIND, None),
        libc.mount(None, folder, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None),
    ):
        if result != 0:
            report.write_text(f"setup failed: {os.strerror(ctypes.get_errno())}")
            raise SystemExit(1)
    try:
        (pathlib.Path(folder.decode()) / "probe").write_text("rank 1")
        report.write_text("rank 1 could write")
    except OSError as err:
        report.write_text(f"rank 1 cannot write: {err.strerror}")
"""


def can_make_private_mounts() -> bool:
    return run_command(["unshare", "--mount", "true"]).returncode == 0


def launch(command: list[str], output_dir: Path, env: dict | None = None) -> Run:
    """Run a short smoke training into `output_dir` and return what it left and logged."""
    result = run_command([*command, *SHORT_RUN, "--output_dir", str(output_dir)], env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(output_dir, json.loads((output_dir / "run_summary.json").read_text()), result.stderr)


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory) -> Run:
    return launch(LAUNCH, tmp_path_factory.mktemp("one") / "out")


@pytest.fixture(scope="module")
def two_processes(tiny_model, tmp_path_factory) -> Run:
    """Two ranks (no GPU: use_cpu is set by itself); where the machine allows, rank 1 sees output_dir read-only."""
    folder = tmp_path_factory.mktemp("two")
    output_dir, env = folder / "out", None
    if can_make_private_mounts():
        output_dir.mkdir()
        (folder / "site").mkdir()
        (folder / "site" / "sitecustomize.py").write_text(READ_ONLY_FOR_RANK_1)
        report = folder / "rank1.txt"
        env = {"PYTHONPATH": str(folder / "site"), "READ_ONLY_DIR": str(output_dir), "READ_ONLY_REPORT": str(report)}
    return launch(TWO_PROCESSES, output_dir, env)


def test_the_two_ranks_see_different_halves_of_the_epoch(one_process, two_processes):
    """Each rank counts the supervised tokens of the batches it trained on. The counts differ, so the ranks did
    not see the same batches, and they add up to exactly the tokens one process sees in the same epoch, so
    together the two ranks saw every example once: none twice, none left out."""
    single, double = one_process.summary, two_processes.summary
    per_rank = double["supervised_tokens_per_rank"]
    assert double["num_processes"] == 2 and len(per_rank) == 2
    assert per_rank[0] != per_rank[1] and min(per_rank) > 0
    assert sum(per_rank) == double["supervised_tokens"] == single["supervised_tokens"]


def test_two_processes_take_half_the_optimizer_steps(one_process, two_processes):
    """Same per-device batch (8) and no gradient accumulation: one process takes an optimizer step per batch of
    8, two processes take one step per 8 + 8 = 16 samples (DDP averages the two ranks' gradients into one
    update). The global batch doubles, so one epoch of 96 samples takes 96 / 16 = 6 steps instead of
    96 / 8 = 12. (With the global batch held equal, i.e. 4 per device, the step count would stay 12.)"""
    single, double = one_process.summary, two_processes.summary
    assert single["global_step"] == 96 // 8 == 12
    assert double["global_step"] == single["global_step"] // 2 == 6
    assert double["epochs"] == single["epochs"] == 1.0


def test_only_rank_zero_writes_the_output(one_process, two_processes):
    """Rank 1 saw output_dir read-only (its probe write failed) and the run still succeeded: rank 1 wrote nothing
    there. The final save's log line appears once although both ranks log at INFO, and the folder holds the same
    single set of files as a one-process run's, nothing half-written left behind."""
    if not can_make_private_mounts():
        pytest.skip("this machine cannot give rank 1 a read-only view of output_dir (needs `unshare --mount`)")
    report = two_processes.output_dir.parent / "rank1.txt"
    assert report.read_text() == "rank 1 cannot write: Read-only file system"
    assert two_processes.log.count("run finished: adapter and run_summary.json in") == 1
    files = {path.name for path in two_processes.output_dir.iterdir()}
    assert files == {path.name for path in one_process.output_dir.iterdir()}
    assert {"adapter_model.safetensors", "recipe.yaml", "run_summary.json", "trainer_state.json"} <= files
    recipe = yaml.safe_load((two_processes.output_dir / "recipe.yaml").read_text())
    assert recipe["output_dir"] == str(two_processes.output_dir)


def fsdp_plugin_launched_with(config_file: Path):
    """The FSDP plugin a process started by `accelerate launch --config_file config_file` builds, and its warnings."""
    args = launch_command_parser().parse_args(["--config_file", str(config_file), "sft/run.py"])
    args, _, _ = _validate_launch_command(args)
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        return FullyShardedDataParallelPlugin(), [str(w.message) for w in warned]


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_every_launch_config_loads_with_accelerate(name):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.num_processes >= 1 and config.num_machines >= 1
    if config.distributed_type == DistributedType.FSDP:
        plugin, warned = fsdp_plugin_launched_with(CONFIGS / name)
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FSDP2, fully sharded
        assert plugin.cpu_ram_efficient_loading
        # sharded checkpoints (no full model gathered at each save); FSDP's own activation checkpointing
        assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and plugin.activation_checkpointing
        assert warned == []  # no FSDP1-only key that FSDP2 ignores with a warning
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_init_flag"]


def test_the_multi_node_example_names_every_machine_setting():
    config = load_config_from_file(str(CONFIGS / "multi_node.yaml"))
    assert config.num_machines > 1 and config.num_processes % config.num_machines == 0
    assert config.main_process_ip and config.main_process_port and config.machine_rank == 0


def _stub(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_the_slurm_script_starts_accelerate_on_every_node_with_its_rank(tmp_path):
    """With `srun` and `scontrol` stubbed (two nodes), each node's launcher gets its own machine_rank and node
    0's hostname as the main process address."""
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    _stub(bin_dir / "scontrol", "printf 'gpu-node-07\\ngpu-node-08\\n'")
    _stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\nfor id in 0 1; do SLURM_NODEID=$id "$@"; done')
    _stub(venv_bin / "accelerate", 'echo "node $SLURM_NODEID: $*"; echo "cpus $SRUN_CPUS_PER_TASK"')
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "VENV": str(tmp_path / "venv"),
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_PER_TASK": "32",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    script = ["bash", "accelerate_configs/slurm_multi_node.sh", "recipes/lccc_base.yaml", "--seed", "1"]
    result = run_command(script, env)
    assert result.returncode == 0, result.stderr
    launches = [line for line in result.stdout.splitlines() if line.startswith("node ")]
    assert len(launches) == 2
    assert result.stdout.count("cpus 32") == 2  # srun passes --cpus-per-task on (Slurm 22.05+ does not by itself)
    for rank, line in enumerate(launches):
        assert f"--machine_rank {rank} " in line
        assert "--num_machines 2 --num_processes 8 " in line
        assert "--main_process_ip gpu-node-07 " in line
        assert line.endswith("sft/run.py --config recipes/lccc_base.yaml --seed 1")


def test_a_signal_to_one_rank_stops_both_at_the_same_step_with_a_checkpoint(tiny_model, tmp_path):
    """SIGTERM reaches only rank 1 (as when one node of a job is preempted): both ranks still save one
    checkpoint at the same step and exit cleanly, and the folder does not look finished."""
    output_dir = tmp_path / "out"
    log = tmp_path / "run.log"
    command = [*TWO_PROCESSES, "--config", "recipes/smoke.yaml", "--max_steps", "5000", "--save_steps", "5000"]
    command += ["--eval_strategy", "no", "--logging_steps", "1", "--output_dir", str(output_dir)]
    launcher = start_command(command, log)
    wait_for(lambda: "'loss':" in log.read_text(), launcher)
    # each worker started as `sft/run.py` and runs on as `-m sft.run` (sft/as_module.py), keeping its process id
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "sft.run" in p.cmdline()]
    rank_1 = next(p for p in workers if p.environ().get("RANK") == "1")
    rank_1.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=180) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "received SIGTERM" in text and text.count("run the same command again to resume") >= 1
    checkpoint = latest_complete_checkpoint(output_dir)
    assert checkpoint is not None and len(list(output_dir.glob("checkpoint-*"))) == 1
    assert not (output_dir / "run_summary.json").exists()


SIGNAL_ONE_RANK = """
import os, signal, sys
from pathlib import Path
from accelerate import Accelerator
from transformers import TrainerControl
from sft.train.checkpoints import StopOnSignal

accelerator = Accelerator(cpu=True)
stopper = StopOnSignal(accelerator)
for step in range(1, 5):
    if step == 3 and accelerator.process_index == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 gets it, after its step 2 check
    control = TrainerControl()
    stopper.on_step_end(None, None, control)
    if control.should_training_stop:
        break
report = f"rank {accelerator.process_index}: stopped at step {step}, save {control.should_save}, got {stopper.received}"
Path(sys.argv[1], f"rank{accelerator.process_index}.txt").write_text(report)  # one file each: no interleaved output
"""


def test_the_real_cross_rank_check_stops_both_ranks_when_one_got_the_signal(tmp_path):
    """StopOnSignal's own check (accelerate's trigger, an all-reduce over gloo) across two real processes: rank 0
    never got a signal, yet it stops at the same step as rank 1, and no rank stopped before the signal."""
    script = tmp_path / "signal_one_rank.py"
    script.write_text(SIGNAL_ONE_RANK)
    result = run_command([*TWO_PROCESSES[:-1], str(script), str(tmp_path)], env={"PYTHONPATH": str(ROOT)}, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert lines == [
        "rank 0: stopped at step 3, save True, got None",
        f"rank 1: stopped at step 3, save True, got {int(signal.SIGTERM)}",
    ]


SAMPLES_PER_RANK = """
import hashlib, json, sys
from sft.common.config import parse_recipe
from sft.data import load_conversations
from sft.train.trainer import build_trainer

recipe = parse_recipe(sys.argv[1:])
trainer = build_trainer(recipe, load_conversations(recipe.data, recipe.training.seed))


def key(ids):
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


seen = [
    key(row[mask.bool()].tolist())
    for batch in trainer.get_train_dataloader()
    for row, mask in zip(batch["input_ids"], batch["attention_mask"])
]
print("samples", json.dumps({"rank": trainer.accelerator.process_index, "seen": seen,
                             "epoch": [key(sample["input_ids"]) for sample in trainer.train_dataset]}))
"""


def test_the_two_ranks_train_on_disjoint_halves_that_make_the_epoch(tiny_model, tmp_path):
    """The samples themselves: each rank's batches (the trainer's own dataloader, sharded by accelerate) hold
    48 of the 96 samples, no sample is in both, and together they are exactly the epoch's samples."""
    script = tmp_path / "samples_per_rank.py"
    script.write_text(SAMPLES_PER_RANK)
    command = [*TWO_PROCESSES[:-1], str(script), *SHORT_RUN, "--output_dir", str(tmp_path / "out")]
    result = run_command(command, env={"PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line[8:]) for line in result.stdout.splitlines() if line.startswith("samples ")]
    ranks = sorted(reports, key=lambda report: report["rank"])
    assert [report["rank"] for report in ranks] == [0, 1]
    first, second = (Counter(report["seen"]) for report in ranks)
    assert sum(first.values()) == sum(second.values()) == 48
    assert not first.keys() & second.keys(), "a sample was trained on by both ranks"
    assert first + second == Counter(ranks[0]["epoch"]), "the two halves are not the epoch"


def fsdp2_steps(processes: int, tiny_model: Path, output: Path) -> dict:
    command = ["torchrun", "--standalone", "--nproc_per_node", str(processes), "tests/fsdp2_qlora_steps.py"]
    result = run_command([*command, str(tiny_model), str(output)])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.mark.slow
def test_fsdp2_shards_4bit_weights_stored_in_the_compute_dtype_on_two_cpu_processes(tiny_model, tmp_path):
    """torch's FSDP2 over the 4-bit smoke model with LoRA, 2 gloo processes: the launcher cannot take this path on
    CPUs (accelerate sets FSDP up only on GPUs), so this shows FSDP2 + bitsandbytes 4-bit themselves work: the
    Params4bit weights become DTensor shards, the loss falls, and the LoRA weights equal a 1-process run's."""
    two = fsdp2_steps(2, tiny_model, tmp_path / "two.json")
    one = fsdp2_steps(1, tiny_model, tmp_path / "one.json")
    assert two["world_size"] == 2 and two["stored"] == {"class": "Params4bit", "dtype": "torch.float32"}
    assert two["sharded_class"] == "DTensor"
    assert two["losses"][-1] < two["losses"][0]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for name, values in one["lora"].items():
        assert two["lora"][name] == pytest.approx(values, rel=1e-4, abs=1e-6), name
