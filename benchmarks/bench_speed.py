"""CPU training speed: TRL's own `trl sft` CLI against our launcher, on the same model, data and settings.

    python -m benchmarks.bench_speed              # or `make bench`: one round, about 2.5 minutes on 2 cores
    python -m benchmarks.bench_speed --repeats 3  # three rounds, the fastest of each contender counts

On the smoke model (build/tiny-llama) and the shared LCCC toy data (../shared/lccc/toy_data.json), runs in turn:
(1) `trl sft` on the chat conversations our data module makes from that file, written as JSONL, with the smoke
recipe's settings (4-bit NF4, LoRA r=16 on all linear layers, assistant-only loss through our Llama-2 training
template, same batch, learning rate and max_length); (2) our launcher with the same recipe; (3) our launcher with
packing (`--packing true --packing_strategy bfd`). Each trains one epoch over the same samples through
`accelerate launch` with accelerate_configs/single_gpu.yaml. Reports wall time (start to exit), train_runtime,
supervised tokens (those that carry loss) per second of training and the padding share of the batches (pad
slots over all slots), all read back from the epoch-end log of each run's checkpoint. Supervised tokens are
counted in training by our launcher and from the data for TRL's CLI (the assistant-marked tokens of the epoch);
the two counts agree. Saves benchmarks/results/speed_cpu.json and prints a Markdown table.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from importlib.metadata import version
from pathlib import Path

import yaml
from datasets import disable_progress_bars

from benchmarks.common import RESULTS, ROOT
from sft.common.config import DataArguments, RunArguments, parse_recipe
from sft.data import load_conversations

TOY_DATA = ROOT.parent / "shared" / "lccc" / "toy_data.json"
TINY_MODEL = ROOT / "build" / "tiny-llama"
TEMPLATE = ROOT / "sft" / "common" / "templates" / "llama2_chat_training.jinja"
ACCELERATE_CONFIG = "accelerate_configs/single_gpu.yaml"
SMOKE_RECIPE = "recipes/smoke.yaml"
RESULTS_FILE = RESULTS / "speed_cpu.json"
OUR_KEYS = {f.name for f in fields(DataArguments)} | {f.name for f in fields(RunArguments)}
PACKING = ["--packing", "true", "--packing_strategy", "bfd"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512, help="training samples (one epoch); a multiple of 8")
    parser.add_argument("--data", type=Path, default=TOY_DATA, help="LCCC JSON file")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench_speed")
    parser.add_argument("--output", type=Path, default=RESULTS_FILE)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all contenders; the fastest counts")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace) -> dict:
    """Changes to the smoke recipe: one epoch on the toy data; the epoch-end log and checkpoint give the figures."""
    return {
        "dataset_name": str(args.data),
        "max_train_samples": args.samples,
        "num_train_epochs": 1,
        "eval_strategy": "no",
        "eval_on_start": False,
        "logging_strategy": "epoch",
        "save_strategy": "epoch",
        "save_only_model": True,
        "include_num_input_tokens_seen": True,  # "all": every batch slot, padding included
        "report_to": "none",
    }


def as_flags(values: dict) -> list[str]:
    """`--key value` words for our launcher."""
    words = []
    for key, value in values.items():
        words += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return words


def write_jsonl(dataset, folder: Path) -> Path:
    """The conversations as `train.jsonl`, which `load_dataset(folder)` reads as the train split."""
    folder.mkdir(parents=True)
    with (folder / "train.jsonl").open("w", encoding="utf-8") as out:
        for row in dataset:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return folder


def trl_settings(values: dict, data_folder: Path) -> dict:
    """The same settings minus our own keys, for `trl sft --config`, on the JSONL folder and our template."""
    config = {key: value for key, value in values.items() if key not in OUR_KEYS}
    return config | {"dataset_name": str(data_folder), "chat_template_path": str(TEMPLATE)}


def supervised_tokens(dataset, max_length: int) -> int:
    """Tokens that carry loss in one epoch: the assistant-marked tokens of each sample, cut at max_length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    tokenizer.chat_template = TEMPLATE.read_text(encoding="utf-8")
    total = 0
    for row in dataset:
        encoded = tokenizer.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
        total += sum(encoded["assistant_masks"][:max_length])
    return total


def run_timed(command: list[str], env: dict) -> float:
    """Run a command from the repository root; return its wall time, stopping on failure with its log's tail."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return wall


def epoch_end_log(output_dir: Path) -> tuple[dict, int]:
    """The epoch-end log entry (tokens seen, real tokens, runtime) and step count from the epoch's checkpoint."""
    checkpoint = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    entry = [e for e in state["log_history"] if "num_input_tokens_seen" in e and "num_tokens" in e][-1]
    return entry, state["global_step"]


def counted_supervised_tokens(output_dir: Path) -> int | None:
    """What our launcher counted in training (run_summary.json); TRL's CLI counts none."""
    summary = output_dir / "run_summary.json"
    return json.loads(summary.read_text())["supervised_tokens"] if summary.is_file() else None


def measure(name: str, command: list[str], output_dir: Path, env: dict, supervised: int) -> dict:
    """Run one contender and read its figures back from what it wrote; supervised tokens as counted if counted."""
    wall = run_timed(command, env)
    entry, steps = epoch_end_log(output_dir)
    runtime = float(entry["train_runtime"])
    supervised = counted_supervised_tokens(output_dir) or supervised
    slots, real = int(entry["num_input_tokens_seen"]), int(float(entry["num_tokens"]))
    result = {
        "name": name,
        "wall_time_s": round(wall, 2),
        "train_runtime_s": round(runtime, 2),
        "optimizer_steps": steps,
        "supervised_tokens": supervised,
        "supervised_tokens_per_s": round(supervised / runtime, 1),
        "batch_slots": slots,
        "real_tokens": real,
        "padding_share": round(1 - real / slots, 4),
    }
    print(f"{name}: {result['wall_time_s']} s wall, {result['train_runtime_s']} s training", file=sys.stderr)
    return result


def markdown_table(results: list[dict]) -> str:
    """The README table: one row per contender, ratios against TRL's CLI."""
    trl = results[0]
    lines = [
        "| run | wall time | train_runtime | steps | supervised tokens/s | padding share | wall vs TRL | "
        "supervised tokens/s vs TRL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        wall_ratio = r["wall_time_s"] / trl["wall_time_s"]
        speed_ratio = r["supervised_tokens_per_s"] / trl["supervised_tokens_per_s"]
        lines.append(
            f"| {r['name']} | {r['wall_time_s']:.1f} s | {r['train_runtime_s']:.1f} s | {r['optimizer_steps']} | "
            f"{r['supervised_tokens_per_s']:,.0f} | {r['padding_share']:.1%} | {wall_ratio:.2f}x | {speed_ratio:.2f}x |"
        )
    return "\n".join(lines)


def child_env(run_dir: Path) -> dict:
    """This virtualenv first on PATH, offline, and a fresh datasets cache per run (no reuse between runs)."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(run_dir / "hf-datasets"),
    }


def trl_command(config: dict, run_dir: Path) -> list[str]:
    """`trl sft` with its config file (output folder included) written into the run's folder."""
    path = run_dir / "trl_sft.yaml"
    path.write_text(yaml.safe_dump(config | {"output_dir": str(run_dir / "out")}, allow_unicode=True), encoding="utf-8")
    return ["trl", "sft", "--config", str(path), "--accelerate_config", ACCELERATE_CONFIG]


def our_command(flags: list[str], run_dir: Path) -> list[str]:
    """Our launcher, preparing the LCCC file itself into the run's own data cache, as a first real run does."""
    return [
        *["accelerate", "launch", "--quiet", "--config_file", ACCELERATE_CONFIG, "sft/run.py", *flags],
        *["--output_dir", str(run_dir / "out"), "--processed_dir", str(run_dir / "data")],
    ]


def contenders(flags: list[str], trl_config: dict) -> list[tuple[str, str, Callable[[Path], list[str]]]]:
    """Each contender's name, folder name and how to build its command for a run folder."""
    return [
        ("TRL `trl sft`", "trl", lambda run_dir: trl_command(trl_config, run_dir)),
        ("ours", "ours", lambda run_dir: our_command(flags, run_dir)),
        ("ours + packing (bfd)", "packed", lambda run_dir: our_command([*flags, *PACKING], run_dir)),
    ]


def warm_up() -> None:
    """Import the training stack once so that the first contender does not pay for a cold file cache."""
    imports = "import torch, transformers, trl, peft, bitsandbytes, accelerate"
    subprocess.run([sys.executable, "-c", imports], check=True)


def run_rounds(entries: list, repeats: int, workdir: Path, supervised: int) -> dict[str, list[dict]]:
    """Every contender once per round, each round starting with the next one, so no one always goes first."""
    runs = {name: [] for name, _, _ in entries}
    for round_number in range(repeats):
        shift = round_number % len(entries)
        for name, folder, build in entries[shift:] + entries[:shift]:
            run_dir = workdir / f"{folder}-{round_number}"
            run_dir.mkdir(parents=True)
            command = build(run_dir)
            runs[name].append(measure(name, command, run_dir / "out", child_env(run_dir), supervised))
    return runs


def best_of(runs: list[dict]) -> dict:
    """The fastest repeat of a contender (least disturbed by other work on the machine)."""
    return min(runs, key=lambda r: r["wall_time_s"])


def write_report(args, changes: dict, samples: int, supervised: int, runs: dict, results: list[dict]) -> None:
    """Settings, machine, versions, the best run of each contender and every run, as JSON."""
    report = {
        "settings": {
            "model": str(TINY_MODEL.relative_to(ROOT)),
            "data": os.path.relpath(args.data, ROOT),
            "train_samples": samples,
            "supervised_tokens_per_epoch_from_data": supervised,
            "epochs": 1,
            "recipe": SMOKE_RECIPE,
            "overrides": changes | {"dataset_name": os.path.relpath(args.data, ROOT)},
            "accelerate_config": ACCELERATE_CONFIG,
            "repeats": args.repeats,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": {name: version(name) for name in ("torch", "transformers", "trl", "peft", "bitsandbytes")},
        "results": results,
        "all_runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"skipped: {args.data} is absent (the shared LCCC toy data; pass --data FILE)", file=sys.stderr)
        return
    if args.samples % 8:
        sys.exit("--samples must be a multiple of 8 (the per-device batch), so that every batch is full")
    if not (TINY_MODEL / "config.json").is_file():
        from sft.tiny import build_tiny_llama

        build_tiny_llama(str(TINY_MODEL))
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    disable_progress_bars()
    changes = overrides(args)
    flags = ["--config", SMOKE_RECIPE, *as_flags(changes)]
    recipe = parse_recipe([*flags, "--processed_dir", str(workdir / "data-bench")])
    train = load_conversations(recipe.data, recipe.training.seed)["train"]
    supervised = supervised_tokens(train, recipe.training.max_length)
    data_folder = write_jsonl(train, workdir / "trl-data")
    smoke = yaml.safe_load((ROOT / SMOKE_RECIPE).read_text(encoding="utf-8"))

    warm_up()
    runs = run_rounds(contenders(flags, trl_settings(smoke | changes, data_folder)), args.repeats, workdir, supervised)
    results = [best_of(repeats) for repeats in runs.values()]
    write_report(args, changes, len(train), supervised, runs, results)
    print(markdown_table(results))
    print(f"\nsaved {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
