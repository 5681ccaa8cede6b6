"""`python -m sft.data`: prepare a recipe's data alone and add token statistics to its `stats.json`."""

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sft.common.arguments import did_you_mean, parse_arguments, take_recipe
from sft.common.config import RECIPE_DATACLASSES, DataArguments, training_default
from sft.common.errors import LOG_FORMAT, UserError, exits_cleanly_on_user_error
from sft.data.cache import load_prepared
from sft.data.mixture import data_folder
from sft.data.stats import STATS_FILE, token_summary, write_stats

logger = logging.getLogger(__name__)


@dataclass
class PrepareArguments:
    """Options of `python -m sft.data` beside the data arguments; a recipe's seed, max_length and model are used."""

    output_dir: str | None = field(
        default=None,
        metadata={"help": "Folder for prepared data, one sub-folder per set of data arguments (./data/processed)."},
    )
    seed: int = field(
        default=training_default("seed"), metadata={"help": "Seed for carving validation/test splits and subsets."}
    )
    max_length: int | None = field(
        default=training_default("max_length"),
        metadata={"help": "Token limit of a training sample, for the truncation statistics."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model whose tokenizer and chat template measure the samples in tokens."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Revision of the model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the tokenizer's own code to run."})
    chat_template_path: str | None = field(default=None, metadata={"help": "Chat template file for training."})
    token_stats_samples: int = field(
        default=10_000, metadata={"help": "Samples per split tokenized for the token statistics (0: none)."}
    )


def parse_prepare_command(argv: list[str]) -> tuple[DataArguments, PrepareArguments]:
    """`--config recipe.yaml` plus flags (flags win); of the recipe, preparation uses what it needs."""
    recipe, args = take_recipe(argv)
    recipe_keys = {f.name for part in RECIPE_DATACLASSES for f in dataclasses.fields(part)}
    for key in recipe:
        if key not in recipe_keys:
            raise UserError(f"unknown recipe key `{key}`{did_you_mean(key, recipe_keys)}")
    recipe.pop("output_dir", None)  # the recipe's output_dir is training's
    data, command = parse_arguments(
        (DataArguments, PrepareArguments), args, recipe=recipe, ignore_unknown_keys=True, prog="lccc-sft data"
    ).values
    if command.output_dir:
        data.processed_dir = command.output_dir
    return data, command


def add_token_statistics(folder: Path, command: PrepareArguments) -> None:
    """Measure the prepared samples with the model's tokenizer and training template, into `stats.json`."""
    from sft.common.model import check_model_source, load_tokenizer

    try:
        check_model_source(command.model_name_or_path)
        tokenizer = load_tokenizer(
            command.model_name_or_path,
            revision=command.model_revision,
            trust_remote_code=command.trust_remote_code,
            chat_template_path=command.chat_template_path,
        )
    except UserError as err:
        logger.warning("token statistics skipped: %s", err)
        return
    stats = json.loads((folder / STATS_FILE).read_text(encoding="utf-8"))
    measure = dict(tokenizer=tokenizer, max_length=command.max_length, count=command.token_stats_samples)
    stats["tokens"] = {
        "tokenizer": command.model_name_or_path,
        "max_length": command.max_length,
        **{split: token_summary(ds, seed=command.seed, **measure) for split, ds in load_prepared(folder).items()},
    }
    for source in stats.get("sources", {}).values():  # a mixture: each source's training samples before mixing
        train = load_prepared(Path(source["folder"]))["train"]
        source["tokens"] = token_summary(train, seed=command.seed, **measure)
    write_stats(folder, stats)


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> Path:
    """Prepare the data of a recipe or of flags alone, and write `stats.json` next to it."""
    data, command = parse_prepare_command(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    folder = data_folder(data, command.seed)
    if command.model_name_or_path and command.token_stats_samples:
        add_token_statistics(folder, command)
    stats = json.loads((folder / STATS_FILE).read_text(encoding="utf-8"))
    if "sources" in stats:
        shares = stats["train_shares"]
        logger.info(
            "mixture: samples %s, train shares %s; statistics in %s", stats["samples"], shares, folder / STATS_FILE
        )
        return folder
    logger.info(
        "%s: %d dialogues read, dropped %s, samples %s; statistics in %s",
        data.dataset_name,
        stats["dialogues_read"],
        stats["dropped_dialogues"],
        stats["samples"],
        folder / STATS_FILE,
    )
    return folder


if __name__ == "__main__":
    main()
