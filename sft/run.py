"""The launcher's file: `accelerate launch sft/run.py --config recipes/smoke.yaml [--flag value ...]`.

Also `python sft/run.py ...` or `lccc-sft train ...` (one process). A recipe that names `sft_run:` (a finished SFT
run to continue) is a preference recipe and runs the preference stage (`lccc-sft dpo`); any other trains SFT.
See sft/as_module.py for why a started file runs itself again as a module.
"""

if not __package__:
    from as_module import rerun_as_module  # a started file has sft/ first on its module path

    rerun_as_module("sft.run")

import sys  # noqa: E402

from sft.common.errors import exits_cleanly_on_user_error  # noqa: E402


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None):
    """Run the stage the recipe is for: preference tuning when it names `sft_run`, else SFT."""
    from sft.preference.config import is_preference_recipe

    argv = sys.argv[1:] if argv is None else argv
    if is_preference_recipe(argv):
        from sft.preference.launch import main as stage
    else:
        from sft.train.launch import main as stage
    return stage(argv)


if __name__ == "__main__":
    from sft.cli import main as cli

    cli(["train", *sys.argv[1:]])  # through the CLI's wrapper: Ctrl-C while importing is one line too
