"""The server's throughput: concurrent requests one at a time (`--max_batch_size 1`) against batched (the default).

    python -m benchmarks.bench_serve [--model_path build/tiny-llama] [--clients 8] [--max_tokens 32] [--threads 1]

Starts `lccc-sft serve` on 127.0.0.1 once per setting and sends `--clients` streamed requests at once, each asking
for exactly `--max_tokens` tokens (`min_tokens` too, so no reply ends early) with its own seed; measures requests
per second (clients / wall time of the round) and time to first token (first text chunk) per request. The best
round of each setting counts. The servers run with `--threads` torch threads (OMP_NUM_THREADS; 1 by default, as
the other CPU benchmarks: on a shared, busy CPU more threads mostly wait for each other). Prints a Markdown table
and saves benchmarks/results/serve.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.common import RESULTS, ROOT


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_path: str, max_batch_size: int, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`lccc-sft serve` in the background; its process and URL once it answers (within 10 minutes)."""
    port = free_port()
    command = [sys.executable, "-m", "sft", "serve", "--model_path", model_path, "--port", str(port)]
    command += ["--max_batch_size", str(max_batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=5).is_success:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not start; see {log}")


def one_request(url: str, model: str, max_tokens: int, seed: int, start: float) -> float:
    """One streamed request; seconds from the round's start to its first text chunk."""
    body = {"model": model, "messages": [{"role": "user", "content": "你好，今天天气怎么样？"}], "stream": True}
    body |= {"max_tokens": max_tokens, "min_tokens": max_tokens, "seed": seed}
    first = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and '"content": "' in line and '"role"' not in line:
                first = time.perf_counter() - start
    return first


def one_round(url: str, model: str, clients: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        firsts = list(pool.map(lambda seed: one_request(url, model, max_tokens, seed, start), range(clients)))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "requests_per_s": clients / wall, "ttft_mean_s": statistics.mean(firsts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default="build/tiny-llama")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    model = Path(args.model_path).resolve().name
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        for label, batch in (("one at a time (--max_batch_size 1)", 1), ("batched (default)", args.clients)):
            process, url = start_server(args.model_path, batch, args.threads, Path(logs) / f"serve-{batch}.log")
            try:
                one_round(url, model, 1, 2)  # warm-up
                rounds = [one_round(url, model, args.clients, args.max_tokens) for _ in range(args.repeats)]
            finally:
                process.terminate()
                process.wait(timeout=60)
            rows.append({"setting": label, **min(rounds, key=lambda r: r["wall_s"])})
    result = {"settings": vars(args), "machine": platform.processor() or platform.machine(), "rows": rows}
    (RESULTS / "serve.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"| {args.clients} concurrent requests of {args.max_tokens} tokens | wall, s | requests/s | mean TTFT, s |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['setting']} | {row['wall_s']:.1f} | {row['requests_per_s']:.2f} | {row['ttft_mean_s']:.2f} |")


if __name__ == "__main__":
    main()
