"""Fine-tune a chat model on LCCC dialogues with QLoRA.

accelerate launch sft/run.py --config recipes/smoke.yaml [--any_training_argument value ...]
"""

import logging
import sys

from sft.config import parse_recipe
from sft.data import load_conversations
from sft.errors import LOG_FORMAT, exits_cleanly_on_user_error
from sft.model import check_model_source


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> dict:
    recipe = parse_recipe(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        format=LOG_FORMAT,
        level=recipe.training.get_process_log_level(),
    )
    check_model_source(recipe.model.model_name_or_path)
    datasets = load_conversations(recipe.data, recipe.training.seed)

    from sft.train import train  # imports the training stack only once the recipe is known to be good

    return train(recipe, datasets)


if __name__ == "__main__":
    main()
