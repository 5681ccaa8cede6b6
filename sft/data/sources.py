"""Where records come from: a local file of a known kind or a Hub dataset, Arrow-backed per split."""

import dataclasses
import logging
import re
from pathlib import Path

from datasets import Dataset, DatasetDict, Value, load_dataset
from datasets.exceptions import DatasetNotFoundError

from sft.common.config import DataArguments
from sft.common.errors import UserError
from sft.data.files import data_suffix, file_kind, read_lines, unreadable_as_user_error
from sft.data.formats import ALPACA_FIELDS
from sft.data.json_stream import read_json_document
from sft.data.records import CHAT_FIELD, DIALOGUE_FIELDS, SPLIT_NAMES, Source

logger = logging.getLogger(__name__)


LCCC_HUB_ID = "thu-coai/lccc"
PARQUET_REVISION = "refs/convert/parquet"
# The original project's names for LCCC (`--dataset_name lccc-base`) -> the configuration of the Hub's LCCC.
LCCC_NAMES = {"lccc-base": "base", "lccc": "large", "lccc-large": "large"}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def with_lccc_names(args: DataArguments) -> DataArguments:
    """The data arguments with `lccc-base` / `lccc` (when no such file exists) as the Hub's LCCC base / large."""
    config = LCCC_NAMES.get(args.dataset_name or "")
    if config is None or Path(args.dataset_name).exists():
        return args
    if args.dataset_config not in (None, config):
        raise UserError(f"{args.dataset_name} is LCCC-{config}: dataset_config cannot be {args.dataset_config}")
    return dataclasses.replace(args, dataset_name=LCCC_HUB_ID, dataset_config=config)


def locate_source(args: DataArguments) -> tuple[str, Path | None]:
    """The kind of source that `dataset_name` names: a local file of a known kind or a Hub dataset id."""
    name = args.dataset_name
    if not name:
        raise UserError("no data given: set `dataset_name` to a local data file or a Hub dataset id")
    path = Path(name).expanduser()
    if path.is_dir():
        raise UserError(f"{name} is a folder: give one data file (or a Hub dataset id)")
    if path.is_file():
        return file_kind(path), path
    if HUB_ID.fullmatch(name) and not data_suffix(path):
        return "hub", None
    raise UserError(f"data file not found: {name}")


def load_hub(args: DataArguments) -> DatasetDict:
    """A Hub dataset; LCCC is read from the Hub's parquet conversion, as its loading script no longer runs."""
    if args.dataset_name == LCCC_HUB_ID:
        where = {"data_dir": args.dataset_config or "base", "revision": PARQUET_REVISION}
    else:
        where = {"name": args.dataset_config}
    try:
        return load_dataset(args.dataset_name, **where)
    except (DatasetNotFoundError, ConnectionError, FileNotFoundError, ValueError) as err:
        raise UserError(f"could not load {args.dataset_name} from the Hub: {str(err).splitlines()[0]}") from None


def typed_records(ds: Dataset, name: str, args: DataArguments) -> tuple[list[str], str]:
    """The columns that make one record of a typed dataset, and the records' format."""
    wanted, forced = args.dialogue_column, args.data_format
    if forced == "alpaca" or (forced == "auto" and not wanted and {"instruction", "output"} <= ds.features.keys()):
        return [column for column in ALPACA_FIELDS if column in ds.features], "alpaca"
    candidates = [wanted] if wanted else [CHAT_FIELD, "conversations", *DIALOGUE_FIELDS]
    for column in candidates:
        if column not in ds.features:
            continue
        inner = getattr(ds.features[column], "feature", None)
        if inner in (Value("string"), Value("large_string")) and forced in ("auto", "dialogue"):
            return [column], "dialogue"
        if isinstance(inner, dict) and ({"role", "content"} <= inner.keys() or {"from", "value"} <= inner.keys()):
            chat_form = forced in ("auto", "messages") and "role" in inner and column != "conversations"
            return [column], "messages" if chat_form else "sharegpt"
        raise UserError(
            f"column `{column}` of {name} is neither a list of texts nor a list of role/content or from/value messages"
        )
    raise UserError(
        f"{name} has no dialogue column (looked for {', '.join(candidates)}, and instruction/output for alpaca; "
        f"it has {', '.join(ds.column_names)}): set `dialogue_column`"
    )


def read_typed(args: DataArguments, kind: str, path: Path | None, work: Path) -> Source:
    """A Hub dataset or a parquet file: typed columns, one of which holds the dialogues."""
    if kind == "hub":
        loaded = load_hub(args)
    else:
        with unreadable_as_user_error(path):
            loaded = {"train": load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(work))}
    splits = {}
    for split, ds in loaded.items():
        if split in SPLIT_NAMES:
            splits[SPLIT_NAMES[split]] = ds
        else:
            logger.warning("ignoring split `%s`: not a train, validation or test split", split)
    if not splits:
        raise UserError(f"{args.dataset_name} has no train, validation or test split")
    columns, form = typed_records(next(iter(splits.values())), args.dataset_name, args)
    splits = {split: ds.select_columns(columns) for split, ds in splits.items()}
    column = None if form == "alpaca" else columns[0]  # an alpaca record is the whole row
    return Source(args.dataset_name, kind, splits, column, "typed", "row", form)


READERS = {
    "hub": read_typed,
    "parquet": read_typed,
    "jsonl": read_lines,
    "text": read_lines,
    "lccc_json": read_json_document,
    "json_list": read_json_document,
}


def read_source(args: DataArguments, kind: str, path: Path | None, work: Path) -> Source:
    """The records of every split of the source, Arrow-backed, at most `max_samples` per split."""
    source = READERS[kind](args, kind, path, work)
    if not source.splits:
        raise UserError(f"{source.name} holds no dialogues")
    if args.dataset_split:  # only this split, as train: validation and test are carved from it
        only = SPLIT_NAMES.get(args.dataset_split, args.dataset_split)
        if only not in source.splits:
            raise UserError(f"{source.name} has no `{args.dataset_split}` split (it has {', '.join(source.splits)})")
        source.splits = {"train": source.splits[only]}
    if "train" not in source.splits:
        raise UserError(f"{source.name} has no train split (it has {', '.join(source.splits)})")
    if args.max_samples:
        source.splits = {s: ds.select(range(min(args.max_samples, len(ds)))) for s, ds in source.splits.items()}
    return source
