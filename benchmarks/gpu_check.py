"""`make gpu-check`: one command that checks a GPU machine end to end and writes one JSON of results.

    python -m benchmarks.gpu_check      # or `make gpu-check`; a few minutes on one GPU

On a GPU: the plan (`--dry_run`) and the smoke recipe on CUDA in bf16 (FlashAttention-2 when installed); a bf16 run
sent SIGTERM mid-training and then resumed to its end; a 2-process DDP run when two GPUs are present; and the
benchmark rows of the issue (the launcher's attention, packed, and LLaMA-Factory's setting) from
benchmarks/bench_gpu.py. Without CUDA it runs the same steps scaled down (fp32, the small benchmark shape, the
steps that need CUDA listed as skipped), which a test runs so that this script cannot rot while no GPU is at hand.
Every step is a row with its status, seconds and figures; the exit code is 1 if any step failed.
"""

import argparse
import json
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
from sft.train.dry_run import dry_run
from sft.train.machine import machine_facts

RUN = [sys.executable, "sft/run.py", "--config", "recipes/smoke.yaml", "--eval_strategy", "no"]
RUN += ["--disable_tqdm", "true"]
BF16 = ["--dtype", "bfloat16", "--bf16", "true"]
FP32 = ["--dtype", "float32", "--bf16", "false"]


def run(command: list[str], timeout: float) -> tuple[int, str]:
    """Run from the repository root; the exit code and the output."""
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s"
    return done.returncode, done.stdout + done.stderr


def summary_of(output_dir: Path) -> dict:
    return json.loads((output_dir / "run_summary.json").read_text())


def smoke_on_cuda(work: Path, cuda: bool) -> dict:
    """The plan and a full smoke run in bf16 on the GPU (FlashAttention-2 where the plan picks it)."""
    if not cuda:
        return {"status": "skipped", "reason": "no CUDA (the SIGTERM run below trains the smoke recipe on the CPU)"}
    flags = [*BF16, "--output_dir", str(work / "smoke"), "--processed_dir", str(work / "data")]
    plan = dry_run(parse_recipe(["--config", "recipes/smoke.yaml", *flags]))
    code, log = run([*RUN, *flags], timeout=300)
    if code:
        return {"status": "failed", "reason": log[-2000:], "plan": plan}
    summary = summary_of(work / "smoke")
    return {"status": "ok", "plan": plan, "summary": summary}


def sigterm_then_resume(work: Path, cuda: bool) -> dict:
    """SIGTERM after the first logged step: a checkpoint and a clean stop; the same command then resumes to the end."""
    output_dir = work / "stopped"
    command = [*RUN, *(BF16 if cuda else FP32), "--max_steps", "300" if cuda else "24", "--logging_steps", "1"]
    command += ["--save_steps", "1000", "--output_dir", str(output_dir), "--processed_dir", str(work / "data")]
    log_path = work / "stopped.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while "'loss':" not in log_path.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stopped_code = process.wait(timeout=300)
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    if stopped_code or not checkpoints or (output_dir / "run_summary.json").exists():
        reason = f"exit {stopped_code}, checkpoints {checkpoints}: {log_path.read_text()[-1500:]}"
        return {"status": "failed", "reason": reason}
    code, log = run(command, timeout=300)
    if code or "resuming from" not in log:
        return {"status": "failed", "reason": f"resume: exit {code}: {log[-2000:]}"}
    summary = summary_of(output_dir)
    expected = int(command[command.index("--max_steps") + 1])
    status = "ok" if summary["global_step"] == expected else "failed"
    return {"status": status, "stopped_at": checkpoints[-1], "resumed_to_step": summary["global_step"], **summary}


def two_processes(work: Path) -> dict:
    """DDP on two GPUs through accelerate_configs/multi_gpu.yaml."""
    if torch.cuda.device_count() < 2:
        return {"status": "skipped", "reason": f"{torch.cuda.device_count()} GPU(s): needs two"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file"]
    command += ["accelerate_configs/multi_gpu.yaml", "--num_processes", "2", *RUN[1:], *BF16, "--max_steps", "20"]
    command += ["--output_dir", str(work / "ddp"), "--processed_dir", str(work / "data")]
    code, log = run(command, timeout=300)
    if code:
        return {"status": "failed", "reason": log[-2000:]}
    summary = summary_of(work / "ddp")
    return {"status": "ok" if summary["num_processes"] == 2 else "failed", **summary}


def benchmark_rows(work: Path, cuda: bool, time_budget_s: float) -> dict:
    """The launcher's attention on packed rows, and LLaMA-Factory's setting, at the 7B shape (small without CUDA)."""
    fastest = "fa2" if bench_gpu.launcher_attention() == "flash_attention_2" else "sdpa"
    output = work / "bench.json"
    argv = ["--variants", f"{fastest},llamafactory-{fastest}", "--time_budget_s", str(time_budget_s)]
    argv += ["--lengths", "1024"] if cuda else ["--small", "--lengths", "64"]
    bench_gpu.main([*argv, "--output", str(output)])
    report = json.loads(output.read_text())
    failed = [row for row in report["results"] if row["status"] != "ok"]
    return {"status": "failed" if failed else "ok", **report}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, help="results JSON (benchmarks/results/gpu_check.json; without CUDA build/...)"
    )
    parser.add_argument("--bench_time_budget_s", type=float, default=240, help="time for the benchmark rows")
    args = parser.parse_args(argv)
    cuda = machine_facts().cuda
    output = args.output or ROOT / ("benchmarks/results/gpu_check.json" if cuda else "build/gpu_check_cpu.json")
    results = {"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "CPU", "steps": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = Path(scratch)
        steps = {
            "smoke_on_cuda": lambda: smoke_on_cuda(work, cuda),
            "sigterm_then_resume": lambda: sigterm_then_resume(work, cuda),
            "two_processes": lambda: two_processes(work),
            "benchmark_rows": lambda: benchmark_rows(work, cuda, args.bench_time_budget_s),
        }
        for name, step in steps.items():
            started = time.perf_counter()
            try:
                row = step()
            except Exception as err:  # a broken step is a result to report, the other steps still run
                row = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
            results["steps"][name] = {**row, "seconds": round(time.perf_counter() - started, 1)}
            print(f"{name}: {row['status']} {row.get('reason', '')}"[:300], file=sys.stderr, flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"saved {output}", file=sys.stderr)
    if any(step["status"] == "failed" for step in results["steps"].values()):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
