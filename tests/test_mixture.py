"""Several sources in one recipe: shares by weight or count, per-source splits and stats, the cache, mistakes, and
the mixed smoke recipe trained and evaluated offline."""

import json
import math
from unittest import mock

import numpy as np
import pytest
from datasets import Dataset
from helpers import LAUNCH, run_command

from sft.common.config import DataArguments
from sft.common.errors import UserError
from sft.data import load_conversations, mixture
from sft.data.mixture import data_folder, mix_train, mixed_sources, realised_shares

ASSETS = "sft/assets"
SMOKE_SOURCES = [
    {"path": f"{ASSETS}/lccc_sample.json", "label": "lccc", "weight": 0.6},
    {"path": f"{ASSETS}/alpaca_sample.json", "label": "alpaca", "weight": 0.2},
    {"path": f"{ASSETS}/sharegpt_sample.jsonl", "label": "sharegpt", "weight": 0.2},
]


def sources_of(entries: list, **options) -> list:
    return mixed_sources(DataArguments(datasets=entries, **options))


def test_realised_shares_match_the_weights_within_sampling_error():
    weights = [0.5, 0.3, 0.2]
    trains = [Dataset.from_dict({"x": np.arange(30_000) + 100_000 * i}) for i in range(3)]
    entries = [{"path": f"s{i}.jsonl", "weight": weight} for i, weight in enumerate(weights)]
    mixed = mix_train(trains, sources_of(entries), seed=7)
    shares = realised_shares(mixed, ["s0", "s1", "s2"])
    assert len(mixed) > 50_000  # the heaviest source runs out first, at about 30,000 / 0.5 samples
    for share, weight in zip(shares.values(), weights, strict=True):
        assert abs(share - weight) < 4 * math.sqrt(weight * (1 - weight) / len(mixed)), shares
    assert len(np.unique(mixed.with_format("arrow")["x"].to_numpy())) == len(mixed)  # nothing repeated


def test_sample_counts_are_exact_and_repeat_a_small_source():
    trains = [Dataset.from_dict({"x": np.arange(100)}), Dataset.from_dict({"x": np.arange(1000, 1040)})]
    entries = [{"path": "big.jsonl", "samples": 60}, {"path": "small.jsonl", "samples": 100}]
    mixed = mix_train(trains, sources_of(entries), seed=0)
    assert realised_shares(mixed, ["big", "small"]) == {"big": 0.375, "small": 0.625}
    small = [x for x in mixed.with_format("arrow")["x"].to_pylist() if x >= 1000]
    assert sorted(set(small)) == list(range(1000, 1040)) and len(small) == 100


def test_a_mixture_is_prepared_per_source_cached_and_reported(tmp_path):
    args = DataArguments(datasets=SMOKE_SOURCES, processed_dir=str(tmp_path), max_turns=2)
    folder = data_folder(args, 42)
    stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    assert list(stats["sources"]) == ["lccc", "alpaca", "sharegpt"]
    assert [source["data_format"] for source in stats["sources"].values()] == ["dialogue", "alpaca", "sharegpt"]
    assert stats["sources"]["alpaca"]["dropped_dialogues"]["duplicate"] > 0  # every source reports its drops
    assert sum(stats["train_shares"].values()) == pytest.approx(1, abs=1e-3)
    splits = load_conversations(args, 42)
    for split in ("validation", "test"):
        per_source = [len(splits[f"{split}-{label}"]) for label in stats["sources"]]
        assert per_source == [source["samples"][split] for source in stats["sources"].values()]
        assert sum(per_source) == len(splits[split])
    lccc = splits["validation-lccc"][0]["messages"]
    assert len(lccc) <= 4 and " " not in lccc[0]["content"]  # LCCC's options and cleaning applied to it
    with mock.patch.object(mixture, "write_mixture", side_effect=AssertionError("mixed again")):
        assert data_folder(args, 42) == folder
    reweighted = [{**SMOKE_SOURCES[0], "weight": 0.8}, *SMOKE_SOURCES[1:]]
    assert data_folder(DataArguments(datasets=reweighted, processed_dir=str(tmp_path), max_turns=2), 42) != folder
    assert len(list(tmp_path.glob("*/stats.json"))) == 5  # 3 sources, prepared once, in 2 mixtures


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"path": "a.json", "wieght": 1}], "datasets[1]: unknown key `wieght` (did you mean `weight`?)"),
        ([{"path": "a.json", "weight": 1, "samples": 5}], "give a `weight` or a sample count `samples`, not both"),
        ([{"path": "a.json", "weight": 1}, {"path": "b.json"}], "give a `weight` to every source"),
        ([{"path": "a.json"}, {"path": "dir/a.jsonl"}], "two sources have the same label"),
        ([{"path": "a.json", "weight": -1}], "`weight` must be a positive number"),
        ([{"path": "a.json", "max_turns": 0}], "datasets[1]: max_turns must be at least 1"),
        ([{"name": "base"}], "datasets[1] must be a mapping with at least `path:"),
    ],
)
def test_mixture_mistakes_are_one_clear_message(entries, message):
    with pytest.raises(UserError) as err:
        sources_of(entries)
    assert message in str(err.value)


def test_sources_of_different_sample_forms_do_not_mix(tmp_path):
    entries = [{**SMOKE_SOURCES[0], "sample_format": "per_turn"}, SMOKE_SOURCES[1]]
    with pytest.raises(UserError, match="different forms"):
        data_folder(DataArguments(datasets=entries, processed_dir=str(tmp_path)), 42)


def test_the_original_names_are_lccc_in_a_mixture():
    (lccc,) = sources_of([{"path": "lccc-base"}])
    assert (lccc.label, lccc.args.dataset_name, lccc.args.dataset_config) == ("lccc", "thu-coai/lccc", "base")


@pytest.mark.slow
def test_the_mixed_smoke_recipe_trains_with_eval_losses_per_source_and_evaluates_per_source(tiny_model, tmp_path):
    from sft.evaluation.evaluate import main as evaluate

    output_dir = tmp_path / "out"
    tiny = ["--max_steps", "4", "--eval_steps", "2", "--save_steps", "4", "--max_length", "128"]
    result = run_command([*LAUNCH, "--config", "recipes/smoke_mix.yaml", "--output_dir", str(output_dir), *tiny])
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    for label in ("lccc", "alpaca", "sharegpt"):  # each evaluated on start and after steps 2 and 4
        losses = [entry[f"eval_{label}_loss"] for entry in history if f"eval_{label}_loss" in entry]
        assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), (label, losses)
        summary = json.loads((output_dir / "run_summary.json").read_text())
        assert summary["eval_loss_by_source"][label]["history"] == losses

    report = evaluate(["--model_path", str(output_dir), "--output_dir", str(tmp_path / "eval"), "--num_samples", "2"])
    assert report["perplexity_by_source"].keys() == {"lccc", "alpaca", "sharegpt"}
    assert all(1 < value < math.inf for value in report["perplexity_by_source"].values())
