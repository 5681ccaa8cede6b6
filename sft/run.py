"""The launcher's file: `accelerate launch sft/run.py --config recipes/smoke.yaml [--flag value ...]`.

Also `python sft/run.py ...` or `lccc-sft train ...` (one process). See sft/as_module.py for why a started file
runs itself again as a module.
"""

if not __package__:
    from as_module import rerun_as_module  # a started file has sft/ first on its module path

    rerun_as_module("sft.run")

import sys  # noqa: E402

from sft.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])  # through the CLI's wrapper: Ctrl-C while importing is one line too
