"""A mixture's cache key and weights: a capped run never shares the full run's mixture; weights are shares."""

import json
import math

import numpy as np
from datasets import Dataset

from sft.common.config import DataArguments
from sft.data.mixture import data_folder, mix_train, mixed_sources, realised_shares

SOURCES = [
    {"path": "sft/assets/lccc_sample.json", "label": "lccc", "weight": 0.5},
    {"path": "sft/assets/sharegpt_sample.jsonl", "label": "sharegpt", "weight": 0.5},
]


def train_rows(folder) -> int:
    return json.loads((folder / "stats.json").read_text(encoding="utf-8"))["samples"]["train"]


def test_the_mixture_cache_key_covers_max_train_samples(tmp_path):
    """A quick capped run and the full run of the same sources must not share a prepared mixture."""
    full = data_folder(DataArguments(datasets=SOURCES, processed_dir=str(tmp_path)), 42)
    capped = data_folder(DataArguments(datasets=SOURCES, processed_dir=str(tmp_path), max_train_samples=5), 42)
    assert capped != full
    assert train_rows(capped) == 5 and train_rows(full) > 5
    again = data_folder(DataArguments(datasets=SOURCES, processed_dir=str(tmp_path)), 42)
    assert again == full and train_rows(again) == train_rows(full)


def test_another_seed_prepares_its_own_sources_and_mixture(tmp_path):
    """The seed draws each source's held-out split, so it keys the sources' folders as well as the mixture's."""
    first = data_folder(DataArguments(datasets=SOURCES, processed_dir=str(tmp_path)), 1)
    second = data_folder(DataArguments(datasets=SOURCES, processed_dir=str(tmp_path)), 2)
    assert first != second
    sources = sorted(path.name for path in tmp_path.iterdir() if path.is_dir() and not path.name.startswith("mix-"))
    assert len(sources) == 4, sources  # two sources, each prepared once per seed


def test_weights_are_normalised_into_shares():
    """Weights 3:1 give shares 0.75/0.25 (within sampling error), whatever their sum."""
    trains = [Dataset.from_dict({"x": np.arange(20_000) + 100_000 * i}) for i in range(2)]
    entries = [{"path": "a.jsonl", "weight": 3}, {"path": "b.jsonl", "weight": 1}]
    mixed = mix_train(trains, mixed_sources(DataArguments(datasets=entries)), seed=3)
    shares = realised_shares(mixed, ["a", "b"])
    for share, expected in zip(shares.values(), (0.75, 0.25), strict=True):
        assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / len(mixed)), shares


def test_a_mixture_is_drawn_again_identically_from_its_seed():
    """The same recipe and seed give the same training order (a resumed or repeated run sees the same data)."""
    trains = [Dataset.from_dict({"x": np.arange(300) + 1_000 * i}) for i in range(2)]
    for entries in (
        [{"path": "a.jsonl", "weight": 3}, {"path": "b.jsonl", "weight": 1}],
        [{"path": "a.jsonl", "samples": 400}, {"path": "b.jsonl", "samples": 100}],
    ):
        sources = mixed_sources(DataArguments(datasets=entries))
        first, again, other = (mix_train(trains, sources, seed=seed)["x"] for seed in (3, 3, 4))
        assert first == again and first != other
