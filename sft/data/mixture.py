"""Several sources in one recipe, each prepared and cached on its own, then mixed by weight or count with `datasets`.

The recipe's `datasets:` list follows TRL's mixture form (`path`, `name`, `split` of each source); beside those a
source takes `format`, any data argument for itself alone (the LCCC cleaning options, `max_samples`, ...), a
`label` (`eval_<label>_loss`), and a `weight` (share of train; TRL calls it `fraction`) or a sample count
`samples`. Weights interleave the sources with those probabilities until one runs out (nothing is repeated);
counts take that many samples of each (repeating a source that has fewer); neither concatenates them whole.
Validation and test stay per source: `validation-<label>` and `test-<label>` beside the combined splits.
"""

import dataclasses
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets, interleave_datasets

from sft.common.arguments import did_you_mean
from sft.common.config import DataArguments
from sft.common.errors import UserError
from sft.data.cache import build_once, code_hash, load_prepared, prepared_folder, write_summary
from sft.data.pipeline import subset
from sft.data.records import SPLITS
from sft.data.sources import LCCC_HUB_ID, LCCC_NAMES, with_lccc_names
from sft.data.stats import STATS_FILE

# TRL's names for a source's fields -> ours.
TRL_KEYS = {"path": "dataset_name", "name": "dataset_config", "split": "dataset_split", "format": "data_format"}
MIX_KEYS = ("weight", "fraction", "samples", "label")
# Data arguments that belong to the whole mixture, not to one source.
MIXTURE_ONLY = ("datasets", "processed_dir", "num_proc", "max_train_samples")
SOURCE_COLUMN = "__source__"


@dataclass
class MixedSource:
    label: str
    args: DataArguments
    weight: float | None
    samples: int | None


def source_label(name: str) -> str:
    """The default label of a source: `lccc` for LCCC, else the file's or Hub dataset's name."""
    if name in LCCC_NAMES or name == LCCC_HUB_ID:
        return "lccc"
    return re.sub(r"\W+", "_", Path(name).name.split(".")[0]).strip("_").lower() or "source"


def mixed_source(entry, number: int, args: DataArguments) -> MixedSource:
    """One entry of `datasets:` as the data arguments of that source, on top of the recipe's."""
    where = f"datasets[{number}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise UserError(f"{where} must be a mapping with at least `path: <file or Hub dataset id>`")
    known = {f.name for f in dataclasses.fields(DataArguments)} - set(MIXTURE_ONLY) - set(TRL_KEYS.values())
    options = {}
    for key, value in entry.items():
        if key in MIX_KEYS:
            continue
        if key not in TRL_KEYS and key not in known:
            hint = did_you_mean(key, [*TRL_KEYS, *MIX_KEYS, *known])
            raise UserError(f"{where}: unknown key `{key}`{hint}")
        options[TRL_KEYS.get(key, key)] = value
    weight = entry.get("weight", entry.get("fraction"))
    samples = entry.get("samples")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0):
        raise UserError(f"{where}: `weight` must be a positive number, got {weight!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise UserError(f"{where}: `samples` must be a whole number of at least 1, got {samples!r}")
    if weight is not None and samples is not None:
        raise UserError(f"{where}: give a `weight` or a sample count `samples`, not both")
    try:
        source_args = dataclasses.replace(args, datasets=None, max_train_samples=None, **options)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: {err}") from None
    label = entry.get("label") or source_label(entry["path"])
    if not isinstance(label, str) or not re.fullmatch(r"\w+", label):
        raise UserError(f"{where}: `label` must be a word (letters, digits, _), got {label!r}")
    return MixedSource(label, with_lccc_names(source_args), weight, samples)


def mixed_sources(args: DataArguments) -> list[MixedSource]:
    """The sources of a mixture, checked: distinct labels, and weights or counts for all of them or for none."""
    if not isinstance(args.datasets, list) or not args.datasets:
        raise UserError("`datasets` must be a list of sources, each with a `path`")
    sources = [mixed_source(entry, number, args) for number, entry in enumerate(args.datasets, 1)]
    labels = [source.label for source in sources]
    if len(set(labels)) < len(labels):
        raise UserError(f"two sources have the same label ({', '.join(labels)}): give each a `label`")
    for kind in ("weight", "samples"):
        given = [getattr(source, kind) is not None for source in sources]
        if any(given) and not all(given):
            raise UserError(f"give a `{kind}` to every source of the mixture or to none")
    return sources


def repeated_rows(count: int, wanted: int, seed: int) -> np.ndarray:
    """`wanted` rows of `count`: whole copies while it has fewer, then a seeded random choice of the rest."""
    return np.concatenate([np.tile(np.arange(count), wanted // count), subset(count, wanted % count, seed)])


def mix_train(trains: list[Dataset], sources: list[MixedSource], seed: int) -> Dataset:
    """The sources' training samples mixed, each tagged in SOURCE_COLUMN with its source's position."""
    tagged = [
        train.add_column(SOURCE_COLUMN, np.full(len(train), number, dtype=np.int32)).shuffle(seed=seed + number)
        for number, train in enumerate(trains)
    ]
    if sources[0].weight is not None:
        weights = np.array([source.weight for source in sources], dtype=float)
        return interleave_datasets(
            tagged, probabilities=(weights / weights.sum()).tolist(), seed=seed, stopping_strategy="first_exhausted"
        )
    if sources[0].samples is not None:
        tagged = [ds.select(repeated_rows(len(ds), s.samples, seed)) for ds, s in zip(tagged, sources, strict=True)]
    return concatenate_datasets(tagged).shuffle(seed=seed)


def realised_shares(mixed: Dataset, labels: list[str]) -> dict[str, float]:
    """Each source's share of the mixed samples."""
    tags = mixed.with_format("arrow")[SOURCE_COLUMN].to_numpy()  # Arrow: far faster than rows through an index
    counts = np.bincount(tags, minlength=len(labels))
    return {label: round(float(count / max(len(mixed), 1)), 4) for label, count in zip(labels, counts, strict=True)}


def source_summary(folder: Path, source: MixedSource) -> dict:
    """What a source's own `stats.json` says, with its weight or count and where it is cached."""
    stats = json.loads((folder / STATS_FILE).read_text(encoding="utf-8"))
    kept = ("dataset_name", "data_format", "dialogues_read", "dropped_dialogues", "cut_utterances")
    summary = {key: stats[key] for key in kept if key in stats}
    return {
        **summary,
        "malformed_examples": stats["malformed_examples"],
        "samples": stats["samples"],
        "weight": source.weight,
        "requested_samples": source.samples,
        "folder": str(folder),
    }


def write_mixture(args: DataArguments, seed: int, sources: list[MixedSource], folders: dict, out: Path) -> None:
    """train.arrow mixed, the held-out splits combined and per source, and `stats.json` with every source."""
    prepared = {source.label: load_prepared(folders[source.label]) for source in sources}
    formats = {label: tuple(splits["train"].column_names) for label, splits in prepared.items()}
    if len(set(formats.values())) > 1:
        raise UserError(
            f"the sources give samples of different forms ({formats}): mix sources of one sample_format "
            "(alpaca, ShareGPT and chat sources always give multi_turn messages)"
        )
    mixed = mix_train([splits["train"] for splits in prepared.values()], sources, seed)
    if args.max_train_samples:
        mixed = mixed.select(range(min(args.max_train_samples, len(mixed))))
    shares = realised_shares(mixed, list(prepared))
    mixed.remove_columns(SOURCE_COLUMN).flatten_indices(cache_file_name=str(out / "train.arrow"))
    for split in SPLITS[1:]:
        for label in prepared:
            shutil.copyfile(folders[label] / f"{split}.arrow", out / f"{split}-{label}.arrow")
        combined = concatenate_datasets([splits[split] for splits in prepared.values()])
        combined.flatten_indices(cache_file_name=str(out / f"{split}.arrow"))
    stats = {
        "dataset_name": "mixture",
        "sources": {source.label: source_summary(folders[source.label], source) for source in sources},
        "train_shares": shares,
    }
    write_summary(out, stats, args, seed)


def prepared_mixture(args: DataArguments, seed: int) -> Path:
    """The cache folder of a mixture: each source prepared (and cached) first, then mixed once."""
    sources = mixed_sources(args)
    folders = {source.label: prepared_folder(source.args, seed) for source in sources}
    identity = {
        "sources": [[s.label, folders[s.label].name, s.weight, s.samples] for s in sources],
        "max_train_samples": args.max_train_samples,
        "seed": seed,
        "code": code_hash(),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(args.processed_dir) / f"mix-{'-'.join(folders)[:80]}-{key}"
    return build_once(folder, "the mixture", lambda work, out: write_mixture(args, seed, sources, folders, out))


def data_folder(args: DataArguments, seed: int) -> Path:
    """The cache folder of the data arguments' source or mixture, prepared first when it does not exist yet."""
    return prepared_mixture(args, seed) if args.datasets else prepared_folder(args, seed)


def load_conversations(args: DataArguments, seed: int) -> DatasetDict:
    """Train/validation/test chat samples (and a mixture's held-out splits per source): prepared on first use,
    read back from the cache while nothing changed."""
    return load_prepared(data_folder(args, seed))


def held_out_by_source(datasets: DatasetDict, split: str) -> dict[str, Dataset] | None:
    """A mixture's `split` per source label (`validation-lccc` -> `lccc`), or None for data of one source."""
    prefix = f"{split}-"
    by_source = {name.removeprefix(prefix): ds for name, ds in datasets.items() if name.startswith(prefix)}
    return by_source or None
