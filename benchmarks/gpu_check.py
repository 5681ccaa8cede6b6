"""`make gpu-check`: one command that checks a GPU machine end to end and writes one JSON of results.

    python -m benchmarks.gpu_check [--budget_s 420] [--steps smoke_on_cuda,benchmark_rows]

On a GPU: the plan (`--dry_run`) and the smoke recipe on CUDA in bf16 (FlashAttention-2 when installed); a bf16 run
sent SIGTERM mid-training and then resumed to its end; a 2-process DDP run when two GPUs are present; and the
benchmark rows of the issue (the launcher's attention, packed, and LLaMA-Factory's setting) from
benchmarks/bench_gpu.py. Without CUDA it runs the same steps scaled down (fp32, the small benchmark shape, the
steps that need CUDA listed as skipped), which a test runs so that this script cannot rot while no GPU is at hand.
Every step is a row with its status, seconds and figures; the exit code is 1 if any step failed.

Made to be cut short: the whole run keeps within `--budget_s` (a step that would start with too little time left
is skipped with the reason, a child process that runs past the budget is stopped), and the results JSON is
rewritten, whole, after every step, so a run killed from outside still leaves the steps it finished.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import bench_gpu
from benchmarks.common import ROOT
from sft.common.config import parse_recipe
from sft.common.files import write_atomically
from sft.train.dry_run import dry_run
from sft.train.machine import machine_facts

RUN = [sys.executable, "sft/run.py", "--config", "recipes/smoke.yaml", "--eval_strategy", "no"]
RUN += ["--disable_tqdm", "true"]
BF16 = ["--dtype", "bfloat16", "--bf16", "true"]
FP32 = ["--dtype", "float32", "--bf16", "false"]
# A step that would start with less time than this left is skipped: it could not finish.
SHORTEST_STEP_S = 20


class Budget:
    """The time left of the run's total budget."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def child_env() -> dict:
    """The children's environment, whatever the caller's: output unbuffered (the SIGTERM step reads the log while
    the run goes on) and this checkout importable without installing the project."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def start(command: list[str], log) -> subprocess.Popen:
    """Start from the repository root in a process group of its own, so that a stop reaches its children too."""
    return subprocess.Popen(
        command, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def stop(process: subprocess.Popen) -> None:
    """SIGKILL the process group (a run out of time: the results say so)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run(command: list[str], budget: Budget) -> tuple[int, str]:
    """Run to its end or to the end of the budget; the exit code (124 when out of time) and the output."""
    with tempfile.TemporaryFile("w+") as log:
        process = start(command, log)
        try:
            code = process.wait(timeout=budget.left())
        except subprocess.TimeoutExpired:
            stop(process)
            code = 124
        log.seek(0)
        output = log.read()
    if code == 124:
        output += f"\nstopped: the time budget of {budget.seconds:.0f} s ran out"
    return code, output


def summary_of(output_dir: Path) -> dict:
    return json.loads((output_dir / "run_summary.json").read_text())


def smoke_on_cuda(work: Path, cuda: bool, budget: Budget) -> dict:
    """The plan and a full smoke run in bf16 on the GPU (FlashAttention-2 where the plan picks it)."""
    if not cuda:
        return {"status": "skipped", "reason": "no CUDA (the SIGTERM run below trains the smoke recipe on the CPU)"}
    flags = [*BF16, "--output_dir", str(work / "smoke"), "--processed_dir", str(work / "data")]
    plan = dry_run(parse_recipe(["--config", "recipes/smoke.yaml", *flags]))
    code, log = run([*RUN, *flags], budget)
    if code:
        return {"status": "failed", "reason": log[-2000:], "plan": plan}
    summary = summary_of(work / "smoke")
    return {"status": "ok", "plan": plan, "summary": summary}


def sigterm_then_resume(work: Path, cuda: bool, budget: Budget) -> dict:
    """SIGTERM after the first logged step: a checkpoint and a clean stop; the same command then resumes to the end."""
    output_dir = work / "stopped"
    command = [*RUN, *(BF16 if cuda else FP32), "--max_steps", "300" if cuda else "24", "--logging_steps", "1"]
    command += ["--save_steps", "1000", "--output_dir", str(output_dir), "--processed_dir", str(work / "data")]
    log_path = work / "stopped.log"
    with log_path.open("w") as log:
        process = start(command, log)
        while "'loss':" not in log_path.read_text() and process.poll() is None and budget.left() > 0:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        try:
            stopped_code = process.wait(timeout=budget.left())
        except subprocess.TimeoutExpired:
            stop(process)
            return {"status": "failed", "reason": f"no stop within the time budget: {log_path.read_text()[-1500:]}"}
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    if stopped_code or not checkpoints or (output_dir / "run_summary.json").exists():
        reason = f"exit {stopped_code}, checkpoints {checkpoints}: {log_path.read_text()[-1500:]}"
        return {"status": "failed", "reason": reason}
    code, log = run(command, budget)
    if code or "resuming from" not in log:
        return {"status": "failed", "reason": f"resume: exit {code}: {log[-2000:]}"}
    summary = summary_of(output_dir)
    expected = int(command[command.index("--max_steps") + 1])
    status = "ok" if summary["global_step"] == expected else "failed"
    return {"status": status, "stopped_at": checkpoints[-1], "resumed_to_step": summary["global_step"], **summary}


def two_processes(work: Path, budget: Budget) -> dict:
    """DDP on two GPUs through accelerate_configs/multi_gpu.yaml."""
    if torch.cuda.device_count() < 2:
        return {"status": "skipped", "reason": f"{torch.cuda.device_count()} GPU(s): needs two"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file"]
    command += ["accelerate_configs/multi_gpu.yaml", "--num_processes", "2", *RUN[1:], *BF16, "--max_steps", "20"]
    command += ["--output_dir", str(work / "ddp"), "--processed_dir", str(work / "data")]
    code, log = run(command, budget)
    if code:
        return {"status": "failed", "reason": log[-2000:]}
    summary = summary_of(work / "ddp")
    return {"status": "ok" if summary["num_processes"] == 2 else "failed", **summary}


def benchmark_rows(work: Path, cuda: bool, budget: Budget, time_budget_s: float) -> dict:
    """The launcher's attention on packed rows, and LLaMA-Factory's setting, at the 7B shape (small without CUDA)."""
    fastest = "fa2" if bench_gpu.launcher_attention() == "flash_attention_2" else "sdpa"
    output = work / "bench.json"
    time_budget_s = min(time_budget_s, budget.left())
    argv = ["--variants", f"{fastest},llamafactory-{fastest}", "--time_budget_s", str(time_budget_s)]
    argv += ["--lengths", "1024"] if cuda else ["--small", "--lengths", "64"]
    bench_gpu.main([*argv, "--output", str(output)])
    report = json.loads(output.read_text())
    failed = [row for row in report["results"] if row["status"] != "ok"]
    return {"status": "failed" if failed else "ok", **report}


STEPS = ("smoke_on_cuda", "sigterm_then_resume", "two_processes", "benchmark_rows")


def step_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"steps are a comma-separated choice of {', '.join(STEPS)}; got {text!r}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, help="results JSON (benchmarks/results/gpu_check.json; without CUDA build/...)"
    )
    parser.add_argument("--budget_s", type=float, default=420, help="time for the whole check, all steps together")
    parser.add_argument("--steps", type=step_names, default=list(STEPS), help=f"which steps: {','.join(STEPS)}")
    parser.add_argument("--bench_time_budget_s", type=float, default=240, help="time for the benchmark rows")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    cuda = machine_facts().cuda
    output = args.output or ROOT / ("benchmarks/results/gpu_check.json" if cuda else "build/gpu_check_cpu.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    results = {"cuda": cuda, "device": device, "budget_s": args.budget_s, "steps": {}}
    write_atomically(output, json.dumps(results, indent=2) + "\n")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = Path(scratch)
        steps = {
            "smoke_on_cuda": lambda: smoke_on_cuda(work, cuda, budget),
            "sigterm_then_resume": lambda: sigterm_then_resume(work, cuda, budget),
            "two_processes": lambda: two_processes(work, budget),
            "benchmark_rows": lambda: benchmark_rows(work, cuda, budget, args.bench_time_budget_s),
        }
        for name in args.steps:
            started = time.perf_counter()
            if budget.left() < SHORTEST_STEP_S:
                row = {"status": "skipped", "reason": f"the time budget of {args.budget_s:.0f} s is spent"}
            else:
                try:
                    row = steps[name]()
                except Exception as err:  # a broken step is a result to report, the other steps still run
                    row = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
            results["steps"][name] = {**row, "seconds": round(time.perf_counter() - started, 1)}
            write_atomically(output, json.dumps(results, indent=2, default=str) + "\n")
            print(f"{name}: {row['status']} {row.get('reason', '')}"[:300], file=sys.stderr, flush=True)
    print(f"saved {output}", file=sys.stderr)
    if any(step["status"] == "failed" for step in results["steps"].values()):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
