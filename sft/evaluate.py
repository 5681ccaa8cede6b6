"""`python sft/evaluate.py --model_path ...`, the original project's form, and `python -m sft.evaluate ...`.

The same as `lccc-sft eval ...`; see sft/as_module.py for why a started file runs itself again as a module.
"""

if not __package__:
    from as_module import rerun_as_module  # a started file has sft/ first on its module path

    rerun_as_module("sft.evaluate")

import sys  # noqa: E402

from sft.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["eval", *sys.argv[1:]])  # through the CLI's wrapper: Ctrl-C while importing is one line too
