"""Data preparation at scale: synthetic LCCC-like dialogues -> `python -m sft.data`, timed, with peak memory.

    python -m benchmarks.bench_data --dialogues 1000000        # or `make bench-data`

Writes an LCCC JSON file of char-segmented dialogues (lengths distributed as in LCCC's sample, Latin words and
digits mixed in, 1% duplicate dialogues, a few empty utterances), prepares it in a fresh cache folder while
sampling the resident memory of the whole process tree, then prepares it again to time the cache. Prints a
Markdown table and keeps the figures in `<workdir>/bench_data.json`.
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from benchmarks.common import ROOT

HAN = (
    "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对"
    "小多然于心学么之都好看起发当没成只如事把还用第样道想作种开美总从无情己面最女但现前些所同日手又行意动"
)
PUNCTUATION = "，。！？～"
LATIN = ["OK", "iPhone", "call", "KTV", "vip", "happy", "mv", "2019", "12", "PS", "good", "LV"]
# Utterances per dialogue in LCCC's sample (../shared/lccc/toy_data.json), 2 to 8.
DIALOGUE_LENGTHS = [2, 3, 4, 5, 6, 7, 8]
LENGTH_WEIGHTS = [200, 647, 300, 121, 65, 23, 23]
SPLIT_SHARES = (("train", 0.98), ("valid", 0.01), ("test", 0.01))


def synthetic_utterance(rng: random.Random) -> str:
    """Char-segmented like LCCC: every character, digit and letter separated by a space."""
    chars = rng.choices(HAN, k=rng.randint(3, 25))
    if rng.random() < 0.08:
        chars.insert(rng.randrange(len(chars)), rng.choice(LATIN))
    if rng.random() < 0.7:
        chars.append(rng.choice(PUNCTUATION))
    return " ".join(" ".join(piece) if piece.isascii() else piece for piece in chars)


def synthetic_dialogue(rng: random.Random, pool: list[str]) -> list[str]:
    dialogue = rng.choices(pool, k=rng.choices(DIALOGUE_LENGTHS, LENGTH_WEIGHTS)[0])
    if rng.random() < 0.001:
        dialogue[rng.randrange(len(dialogue))] = " "
    return dialogue


def synthetic_dialogues(count: int, seed: int = 0):
    """LCCC-like dialogues; one in a hundred repeats one of the last thousand."""
    rng = random.Random(seed)
    pool = [synthetic_utterance(rng) for _ in range(200_000)]
    recent = []
    for _ in range(count):
        dialogue = rng.choice(recent) if recent and rng.random() < 0.01 else synthetic_dialogue(rng, pool)
        recent = (recent + [dialogue])[-1000:]
        yield json.dumps(dialogue, ensure_ascii=False)


def write_source(path: Path, count: int) -> None:
    """LCCC JSON (`{"train": [...], "valid": [...], "test": [...]}`) or JSONL, written dialogue by dialogue."""
    dialogues = synthetic_dialogues(count)
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as out:
        if path.suffix == ".jsonl":
            out.writelines(f"{dialogue}\n" for dialogue in dialogues)
        else:
            out.write("{")
            for number, (split, share) in enumerate(SPLIT_SHARES):
                out.write(f'{"," if number else ""}\n"{split}": [\n')
                for i in range(round(count * share)):
                    out.write(("," if i else "") + next(dialogues) + "\n")
                out.write("]")
            out.write("}\n")
    partial.rename(path)


def children_cpu_s() -> float:
    """CPU seconds of all finished child processes, their own children (the map workers) included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_sampling_memory(command: list[str]) -> tuple[float, float, dict]:
    """Run a command; return its wall time, its CPU time and peak memory in GiB: the process tree's summed RSS,
    its summed PSS (pages shared by forked workers counted once) and the RSS of its largest process."""
    start, cpu_start = time.perf_counter(), children_cpu_s()
    process = psutil.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"tree_rss": 0, "tree_pss": 0, "largest_rss": 0}

    def sample() -> None:
        while process.poll() is None:
            try:
                memory = [p.memory_full_info() for p in [process, *process.children(recursive=True)]]
            except psutil.Error:
                continue
            peaks["tree_rss"] = max(peaks["tree_rss"], sum(m.rss for m in memory))
            peaks["tree_pss"] = max(peaks["tree_pss"], sum(m.pss for m in memory))
            peaks["largest_rss"] = max(peaks["largest_rss"], max(m.rss for m in memory))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = process.communicate()
    sampler.join()
    if process.returncode:
        sys.exit(f"preparation failed:\n{stderr[-3000:]}")
    peak = {name: round(value / 2**30, 2) for name, value in peaks.items()}
    return time.perf_counter() - start, children_cpu_s() - cpu_start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dialogues", type=int, default=1_000_000)
    parser.add_argument("--workdir", default="build/bench-data", help="where the synthetic data and cache go")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count())
    parser.add_argument("--sample_format", default="multi_turn", choices=["multi_turn", "per_turn"])
    parser.add_argument("--source", default="json", choices=["json", "jsonl"], help="LCCC JSON or JSONL")
    args = parser.parse_args()

    workdir = ROOT / args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / f"lccc_synthetic_{args.dialogues}.{args.source}"
    if not data.exists():
        start = time.perf_counter()
        write_source(data, args.dialogues)
        print(f"wrote {data} ({data.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s")
    processed = workdir / "processed"
    shutil.rmtree(processed, ignore_errors=True)
    command = [sys.executable, "-m", "sft.data", "--dataset_name", str(data), "--output_dir", str(processed)]
    command += ["--num_proc", str(args.num_proc), "--sample_format", args.sample_format]
    wall, cpu, peak = run_sampling_memory(command)
    cached_wall, cached_cpu, _ = run_sampling_memory(command)
    preparation_cpu = cpu - cached_cpu  # the cached run is the start-up (imports) and opening the files
    stats = json.loads(next(processed.glob("*/stats.json")).read_text(encoding="utf-8"))
    seconds = stats["seconds"]
    clean_convert = seconds["clean_and_convert"] + seconds["deduplicate_and_split"] + seconds["collect_and_write"]
    read = stats["dialogues_read"]
    figures = {
        "dialogues": read,
        "samples": stats["samples"],
        "dropped_dialogues": stats["dropped_dialogues"],
        "num_proc": args.num_proc,
        "cpu_count": os.cpu_count(),
        "seconds": seconds,
        "clean_and_convert_dialogues_per_s": round(read / clean_convert),
        "all_phases_dialogues_per_s": round(read / sum(seconds.values())),
        "wall_s": round(wall, 1),
        "cached_wall_s": round(cached_wall, 1),
        "preparation_cpu_s": round(preparation_cpu, 1),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "peak_memory_gib": peak,
    }
    (workdir / "bench_data.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
    setting = f"{args.sample_format}, num_proc={args.num_proc}, {os.cpu_count()} cores"
    print(f"| {read:,} dialogues ({data.name}), {setting} | |")
    print("| --- | --- |")
    for phase, value in seconds.items():
        print(f"| {phase} | {value} s |")
    print(f"| cleaning + conversion throughput | {figures['clean_and_convert_dialogues_per_s']:,} dialogues/s |")
    print(f"| all phases (read to saved) | {figures['all_phases_dialogues_per_s']:,} dialogues/s |")
    print(f"| wall time, first run / cached run (incl. ~6 s start-up) | {wall:.0f} s / {cached_wall:.0f} s |")
    print(f"| CPU time of the preparation (all processes, start-up excluded) | {preparation_cpu:.0f} s |")
    print(f"| CPU cost per dialogue, read to saved | {preparation_cpu / read * 1e6:.0f} µs |")
    print(f"| peak memory of the process tree, PSS / RSS | {peak['tree_pss']} GiB / {peak['tree_rss']} GiB |")
    print(f"| peak RSS of the largest process | {peak['largest_rss']} GiB |")
    print(f"| load average (1 min) when done: other work on the machine | {os.getloadavg()[0]:.1f} |")


if __name__ == "__main__":
    main()
