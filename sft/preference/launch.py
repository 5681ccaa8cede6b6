"""`lccc-sft dpo --config recipes/lccc_dpo.yaml` (also `accelerate launch sft/run.py --config ...`, `make dpo`).

The SFT launcher's path: the same plan, output-folder lock, resume, signals, atomic publishing and run summary;
the pairs are the recipe's `pairs_file` or mined from the SFT run first (`lccc-sft pairs`).
"""

import logging
import sys

import yaml

from sft.common.errors import LOG_FORMAT, exits_cleanly_on_user_error
from sft.common.generation import load_generation_defaults
from sft.preference.config import parse_preference_recipe


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> dict:
    recipe = parse_preference_recipe(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format=LOG_FORMAT, level=recipe.training.get_process_log_level())
    from accelerate import PartialState

    from sft.train.machine import machine_facts
    from sft.train.plan import decide

    if recipe.run.dry_run:
        changes = decide(recipe, machine_facts(recipe.training))
        plan = {"sft_run": recipe.preference.sft_run, "changes": [vars(change) for change in changes]}
        if PartialState().is_main_process:
            print(yaml.safe_dump(plan, allow_unicode=True, sort_keys=False), end="")
        return plan

    from datasets import DatasetDict

    from sft.preference.mining import pairs_for
    from sft.preference.pair_files import load_pairs
    from sft.preference.trainer import build_preference_trainer, preference_summary
    from sft.train.trainer import train

    with PartialState().main_process_first():  # rank 0 mines; the others then reuse its pairs
        pairs = load_pairs(pairs_for(recipe), recipe.preference)
    datasets = DatasetDict({"train": pairs})
    generation = load_generation_defaults(recipe.sft.model_path)  # served as the SFT run was
    return train(recipe, datasets, build=build_preference_trainer, summarize=preference_summary, generation=generation)


if __name__ == "__main__":
    main()
