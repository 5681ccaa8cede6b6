"""For sft/'s files started as scripts (`python sft/run.py`, `accelerate launch sft/run.py`): run them as modules.

A started file has its own folder first on the module path, where sft/'s modules would hide libraries (sft/evaluate.py
hides Hugging Face's `evaluate`) and `sft` itself is not importable unless installed. Running the file again as a
module, with this checkout on PYTHONPATH, imports `sft` from here, installed or not. The process keeps its id, so
launchers that watch it (torchrun, SLURM) see no difference.
"""

import os
import sys


def rerun_as_module(module: str) -> None:
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], {**os.environ, "PYTHONPATH": path})
