"""Fine-tune a chat model on LCCC dialogues with QLoRA.

accelerate launch sft/run.py --config recipes/smoke.yaml [--any_training_argument value ...]
accelerate launch sft/run.py --config recipes/lccc_base.yaml --dry_run true   # the plan only: nothing loaded or written
"""

import logging
import os
import sys

import yaml

from sft.common.config import parse_recipe
from sft.common.errors import LOG_FORMAT, exits_cleanly_on_user_error
from sft.common.model import check_model_source
from sft.data import load_conversations


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> dict:
    recipe = parse_recipe(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        format=LOG_FORMAT,
        level=recipe.training.get_process_log_level(),
    )
    check_model_source(recipe.model.model_name_or_path)
    from sft.train.dry_run import check_planned_memory, dry_run

    check_planned_memory(recipe)
    if recipe.run.dry_run:
        plan = dry_run(recipe)
        if int(os.environ.get("RANK", "0")) == 0:  # one plan per launch, not one per process
            print(yaml.safe_dump(plan, allow_unicode=True, sort_keys=False), end="")
        return plan
    datasets = load_conversations(recipe.data, recipe.training.seed)

    from sft.train.trainer import train  # imports the training stack only once the recipe is known to be good

    return train(recipe, datasets)


if __name__ == "__main__":
    main()
