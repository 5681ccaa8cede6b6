"""Packing: a packed batch must give the loss of its sequences run one by one, and unsafe packing is refused."""

import pytest
import torch
from helpers import SMOKE_RECIPE

from sft.common.config import parse_recipe
from sft.data import load_conversations
from sft.train.machine import machine_facts
from sft.train.plan import keep_packed_sequences_apart
from sft.train.trainer import build_trainer

CPU = machine_facts(parse_recipe(["--config", str(SMOKE_RECIPE)]).training)


def packed_trainer(output_dir, attention: str):
    recipe = parse_recipe(
        ["--config", str(SMOKE_RECIPE), "--output_dir", str(output_dir), "--packing", "true"]
        + ["--attn_implementation", attention, "--per_device_train_batch_size", "4"]
    )
    return build_trainer(recipe, load_conversations(recipe.data, recipe.training.seed))


def split_pack(batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (input_ids, labels) of each sequence in a padding-free pack, cut where position_ids restart."""
    ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = [*(positions == 0).nonzero().flatten().tolist(), len(ids)]
    return [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:], strict=False) if b > a]


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_the_loss_of_each_sequence_alone(tiny_model, tmp_path, attention):
    trainer = packed_trainer(tmp_path, attention)
    assert trainer.args.packing and trainer.padding_free
    batch = next(iter(trainer.get_train_dataloader()))
    sequences = split_pack(batch)
    assert batch["input_ids"].shape[0] == 1 and len(sequences) >= 2, "the batch is not a pack of several samples"
    model = trainer.model.train()
    with torch.no_grad():
        packed = trainer.compute_loss(model, dict(batch)).item()
        total, count = 0.0, 0
        for ids, labels in sequences:
            tokens = int((labels[1:] != -100).sum())
            if tokens:
                loss = model(input_ids=ids[None], labels=labels[None], use_cache=False).loss.item()
                total, count = total + loss * tokens, count + tokens
        # The same pack read as one causal sequence lets later samples see earlier ones: the loss moves.
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.item()
    assert packed == pytest.approx(total / count, rel=1e-5)
    assert abs(leaky - packed) > 1e-3, "the check cannot tell isolated packs from leaky ones"


def test_packing_is_refused_where_sequences_could_see_each_other(caplog):
    def decided(*flags):
        recipe = parse_recipe(["--config", str(SMOKE_RECIPE), "--packing", "true", *flags])
        keep_packed_sequences_apart(recipe, CPU, [])
        return recipe.training

    training = decided("--packing_strategy", "wrapped", "--attn_implementation", "sdpa")
    assert not training.packing and training.train_sampling_strategy == "group_by_length"
    assert "packing refused: packing_strategy 'wrapped'" in caplog.text

    training = decided(
        "--attn_implementation", "paged|eager"
    )  # a kernel transformers has, not known to keep them apart
    assert not training.packing and training.train_sampling_strategy == "group_by_length"
    assert "attention 'paged|eager' is not known to keep packed sequences apart" in caplog.text

    assert decided("--attn_implementation", "sdpa").packing
