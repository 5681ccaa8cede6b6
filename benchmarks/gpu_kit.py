"""`make gpu-kit`: the wheels a bare offline GPU machine lacks, and the one command that checks that machine.

    python -m benchmarks.gpu_kit                      # build/gpu-kit/: wheels/, command.sh (printed), size check
    python -m benchmarks.gpu_kit --for-this-machine   # the same kit for this Python (the CPU test uses it)
    python -m benchmarks.gpu_kit --preflight          # (on the machine, run by the command) what the GPU can do

The GPU machines lent here run Python 3.12 with torch 2.11.0+cu130, transformers 5.17, accelerate 1.15 and peft,
and nothing else: no trl, bitsandbytes, datasets, protobuf, no package index. Only files travel with the working
tree, 64 MiB in all. The kit downloads the pinned wheels of what is missing (manylinux x86_64, CPython 3.12),
leaves out of them what training never loads (bitsandbytes' kernels for other CUDA releases and ROCm, pyarrow's
Flight and S3 libraries, pandas' tests), checks that the tree plus the wheels stay under 64 MiB, and writes the
command: install the wheels with `pip install --no-index --no-deps --target`, a preflight (GPU, capability, the
bitsandbytes library loaded, an NF4 forward and backward), the tiny model, then gpu-check within a time budget,
every result under $OUT. docs/gpus-and-speed.md says how to spend the first GPU hour with it.
"""

import argparse
import base64
import fnmatch
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from benchmarks.common import ROOT

# What the machine lacks, pinned, and what of each wheel training does not need (file patterns left out).
KIT = {
    "trl==1.16.0": (),
    # 0.48 is the first release with CUDA 13.0 kernels; torch 2.11+cu130 loads libbitsandbytes_cuda130.so
    "bitsandbytes==0.50.2": ("bitsandbytes/libbitsandbytes_rocm*", "bitsandbytes/libbitsandbytes_xpu*")
    + tuple(f"bitsandbytes/libbitsandbytes_cuda{v}.so" for v in (118, 121, 124, 126, 128, 132)),
    "datasets==5.2.0": (),
    # datasets' own dependencies that torch, transformers, accelerate and peft do not bring
    "pyarrow==26.0.1": (
        "pyarrow/libarrow_flight.*",
        "pyarrow/libarrow_python_flight.*",
        "pyarrow/_flight.*",
        "pyarrow/libarrow_s3.*",
        "pyarrow/_s3fs.*",
        "pyarrow/_pyarrow_cpp_tests.*",
        "pyarrow/include/*",
        "pyarrow/src/*",
        "pyarrow/tests/*",
    ),
    "pandas==3.1.1": ("pandas/tests/*",),
    "python-dateutil==2.9.0.post0": (),
    "six==1.17.0": (),
    "dill==0.4.1": (),
    "multiprocess==0.70.19": (),
    "xxhash==4.1.0": (),
    # sft/tiny.py: the SentencePiece tokenizer, converted by transformers through protobuf
    "sentencepiece==0.2.3": (),
    "protobuf==7.36.2": (),
}
GPU_MACHINE = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
GPU_MACHINE += [f"--platform=manylinux{tag}_x86_64" for tag in ("2014", "_2_24", "_2_28")]
BUDGET_BYTES = 64 * 2**20  # what travels with the working tree, all told
COMMAND_LIMIT = 2000  # characters of one device command
KIT_DIR = Path("build/gpu-kit")

# The one command, run from the repository root on the GPU machine. $OUT comes back; GPU_CHECK_ARGS adds to
# gpu-check's arguments (a test narrows the steps with it). The target's name ends in site-packages: dill (datasets'
# hashing) pickles modules found elsewhere by value, and pyarrow's by value fails ("Can't pickle MonthDayNano").
COMMAND = """set -u; K={kit}; S=${{TMPDIR:-/tmp}}/gpu-kit/site-packages; mkdir -p "$OUT"
T0=$(date +%s); step() {{ echo "$(( $(date +%s) - T0 )) s: $*" | tee -a "$OUT/timeline.txt"; }}
step install; python -m pip install -q --no-index --no-deps --target "$S" "$K"/wheels/*.whl >"$OUT/install.log" 2>&1 \
|| {{ tail -20 "$OUT/install.log"; exit 1; }}
export PYTHONPATH="$S:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step preflight; python -m benchmarks.gpu_kit --preflight --output "$OUT/preflight.json" 2>&1 | tail -20
step tiny-model; test -f build/tiny-llama/config.json || python -m sft tiny --family llama \
--output_dir build/tiny-llama >"$OUT/tiny.log" 2>&1 || {{ tail -20 "$OUT/tiny.log"; exit 1; }}
step gpu-check; python -m benchmarks.gpu_check --budget_s {budget_s} --output "$OUT/gpu_check.json" \
${{GPU_CHECK_ARGS:-}} >"$OUT/gpu_check.log" 2>&1; rc=$?; tail -30 "$OUT/gpu_check.log"
step "done (gpu-check exit $rc)"; exit $rc
"""


def download(requirement: str, wheels: Path, for_this_machine: bool) -> Path:
    """The one wheel of `requirement`, from PyPI (or pip's cache)."""
    before = set(wheels.glob("*.whl"))
    platform = [] if for_this_machine else GPU_MACHINE
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
    subprocess.run([*command, *platform, "-d", str(wheels), requirement], check=True)
    (new,) = set(wheels.glob("*.whl")) - before
    return new


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def trim(wheel: Path, left_out: tuple[str, ...]) -> int:
    """Rewrite `wheel` without the files matching `left_out` (RECORD rewritten to match); the bytes saved."""
    if not left_out:
        return 0
    size = wheel.stat().st_size
    partial = wheel.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as target:
        kept = [i for i in source.infolist() if not any(fnmatch.fnmatch(i.filename, p) for p in left_out)]
        record = next(i for i in kept if i.filename.endswith(".dist-info/RECORD"))
        lines = []
        for info in kept:
            if info is not record:
                data = source.read(info)
                target.writestr(info, data)
                lines.append(record_line(info.filename, data))
        target.writestr(record, "\n".join([*lines, f"{record.filename},,"]) + "\n")
    partial.replace(wheel)
    return size - wheel.stat().st_size


def tree_bytes() -> int:
    """What travels with the working tree: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return sum(p.stat().st_size for name in listed.split(b"\0") if name and (p := ROOT / name.decode()).is_file())


def build(kit: Path, for_this_machine: bool, only: list[str] | None, budget_s: int) -> dict:
    """Download and trim the wheels into `kit`/wheels, write `kit`/command.sh; the sizes, checked."""
    wheels = kit / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    chosen = {r: left_out for r, left_out in KIT.items() if only is None or r.split("==")[0] in only}
    for stale in set(wheels.glob("*.whl")):
        stale.unlink()
    saved = {r: trim(download(r, wheels, for_this_machine), left_out) for r, left_out in chosen.items()}
    wheel_bytes = sum(w.stat().st_size for w in wheels.glob("*.whl"))
    command = COMMAND.format(kit=kit, budget_s=budget_s)
    (kit / "command.sh").write_text(command, encoding="utf-8")
    report = {
        "wheels": sorted(w.name for w in wheels.glob("*.whl")),
        "wheel_mb": round(wheel_bytes / 2**20, 1),
        "tree_mb": round(tree_bytes() / 2**20, 1),
        "left_out_mb": {r: round(b / 2**20, 1) for r, b in saved.items() if b},
        "command_chars": len(command),
    }
    report["total_mb"] = round(report["wheel_mb"] + report["tree_mb"], 1)
    (kit / "kit.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if report["total_mb"] * 2**20 > BUDGET_BYTES or len(command) > COMMAND_LIMIT:
        sys.exit(f"the kit is over its limits: {report['total_mb']} MiB of 64, {len(command)} of {COMMAND_LIMIT} chars")
    return report


def preflight() -> dict:
    """What this machine's GPU and the kit's libraries can do: an NF4 layer's forward and backward on the GPU."""
    import bitsandbytes
    import bitsandbytes.cextension
    import torch
    import transformers
    import trl

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    facts = {
        "device": torch.cuda.get_device_name(0) if cuda else "CPU",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "gpus": torch.cuda.device_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "trl": f"{trl.__version__} ({Path(trl.__file__).parent})",
        "bitsandbytes": bitsandbytes.__version__,
        "bitsandbytes_library": getattr(getattr(bitsandbytes.cextension.lib, "_lib", None), "_name", None),
    }
    started = time.perf_counter()
    try:
        layer = bitsandbytes.nn.Linear4bit(256, 256, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)
        x = torch.randn(8, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
        layer(x).float().square().mean().backward()
        ok = bool(torch.isfinite(x.grad).all()) and layer.weight.__class__.__name__ == "Params4bit"
        facts["nf4_forward_backward"] = "ok" if ok else "non-finite gradient"
    except Exception as err:  # a finding to report, the check goes on
        facts["nf4_forward_backward"] = f"failed: {type(err).__name__}: {err}"
    facts["nf4_seconds"] = round(time.perf_counter() - started, 2)
    facts["datasets_map"] = datasets_map()
    return facts


def datasets_map() -> str:
    """A `datasets` map as data preparation runs one (its fingerprint pickles the function with dill)."""
    import datasets

    try:
        mapped = datasets.Dataset.from_list([{"n": 1}, {"n": 2}]).map(lambda row: {"twice": 2 * row["n"]})
        return "ok" if mapped["twice"] == [2, 4] else f"wrong result {mapped['twice']}"
    except Exception as err:  # a finding to report
        return f"failed: {type(err).__name__}: {err}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="the kit's folder (build/gpu-kit), or the preflight's JSON")
    parser.add_argument("--for-this-machine", action="store_true", help="wheels for this Python and platform")
    parser.add_argument("--only", help="a comma-separated subset of the kit's packages (e.g. trl,datasets)")
    parser.add_argument("--budget_s", type=int, default=400, help="gpu-check's total time budget in the command")
    parser.add_argument("--preflight", action="store_true", help="on the GPU machine: the preflight's JSON")
    args = parser.parse_args(argv)
    if args.preflight:
        facts = json.dumps(preflight(), indent=2)
        print(facts)
        if args.output:
            args.output.write_text(facts + "\n", encoding="utf-8")
        return
    only = args.only.split(",") if args.only else None
    report = build(args.output or KIT_DIR, args.for_this_machine, only, args.budget_s)
    print((args.output or KIT_DIR) / "command.sh", "\n" + ((args.output or KIT_DIR) / "command.sh").read_text())
    print(json.dumps(report, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
