"""Launch decisions at their edges: an A100 (compute capability exactly 8.0) and FlashAttention asked for in fp32."""

import dataclasses

import pytest
from accelerate.utils import DistributedType
from helpers import SMOKE_RECIPE, fake_gpus

from sft.common.config import parse_recipe
from sft.common.errors import UserError
from sft.train.machine import Facts, attention_for, has_native_bf16
from sft.train.plan import decide

A100 = Facts(
    cuda=True,
    capability=(8, 0),
    flash_attn_2=True,
    distributed_type=DistributedType.NO,
    num_processes=1,
    local_rank=0,
    fsdp_activation_checkpointing=False,
)
# lccc_base's precision on the smoke model (use_cpu only lets the bf16 recipe parse here)
BF16 = ["--dtype", "bfloat16", "--bf16", "true", "--use_cpu", "true"]


def recipe(*flags: str):
    return parse_recipe(["--config", str(SMOKE_RECIPE), *flags])


def test_an_a100_keeps_bf16_and_takes_flash_attention_2():
    """Capability 8.0 is the first with native bf16: `>` instead of `>=` would move every A100 run to fp16."""
    assert has_native_bf16(A100)
    assert not has_native_bf16(dataclasses.replace(A100, capability=(7, 5)))
    r = recipe(*BF16)
    changes = {change.key for change in decide(r, A100)}
    assert r.training.bf16 and not r.training.fp16 and r.model.dtype == "bfloat16"
    assert r.model.attn_implementation == "flash_attention_2"
    assert {"bf16", "fp16", "dtype"}.isdisjoint(changes)
    assert attention_for(A100, "bfloat16") == "flash_attention_2"


def test_an_a100_without_flash_attn_installed_takes_sdpa():
    assert attention_for(dataclasses.replace(A100, flash_attn_2=False), "bfloat16") == "sdpa"


@pytest.mark.parametrize("attention", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_asked_for_in_float32_is_refused_with_the_plans_error(attention):
    r = recipe("--attn_implementation", attention, "--dtype", "float32")
    with pytest.raises(UserError, match=f"^{attention} runs only in bfloat16/float16, but dtype is float32$"):
        decide(r, A100)


def test_flash_attention_asked_for_in_half_precision_is_kept():
    r = recipe("--attn_implementation", "flash_attention_2", *BF16)
    decide(r, A100)
    assert r.model.attn_implementation == "flash_attention_2"


def test_machine_facts_on_a_gpu_read_this_processs_own_device(monkeypatch):
    """Rank 3 of a 4-GPU DDP launch on A100s: its own GPU's capability; `use_cpu` turns the GPU facts off."""
    from types import SimpleNamespace

    from sft.train.machine import machine_facts

    asked = fake_gpus(monkeypatch, 4, (8, 0))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_ACTIVATION_CHECKPOINTING"):
        monkeypatch.delenv(name, raising=False)
    facts = machine_facts(SimpleNamespace(use_cpu=False))
    assert (facts.cuda, facts.capability, facts.local_rank, facts.num_processes) == (True, (8, 0), 3, 4)
    assert set(asked) == {3}
    assert facts.distributed_type == DistributedType.MULTI_GPU and not facts.fsdp_activation_checkpointing
    assert has_native_bf16(facts)
    on_cpu = machine_facts(SimpleNamespace(use_cpu=True))
    assert (on_cpu.cuda, on_cpu.capability, on_cpu.local_rank) == (False, None, 0)
    assert on_cpu.distributed_type == DistributedType.MULTI_CPU
    fsdp = SimpleNamespace(use_cpu=False, fsdp="full_shard", fsdp_config={"activation_checkpointing": True})
    assert machine_facts(fsdp).distributed_type == DistributedType.FSDP
    assert machine_facts(fsdp).fsdp_activation_checkpointing
    deepspeed = SimpleNamespace(use_cpu=False, deepspeed="ds_config.json")
    assert machine_facts(deepspeed).distributed_type == DistributedType.DEEPSPEED


def test_one_process_without_a_launcher_is_not_distributed(monkeypatch):
    """`python sft/run.py` on one GPU with flash-attn installed: no WORLD_SIZE or LOCAL_RANK in the environment."""
    import torch

    from sft.train import machine

    for name in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    fake_gpus(monkeypatch, 1, (8, 0))
    monkeypatch.setattr(machine, "is_flash_attn_2_available", lambda: True)
    assert machine.distributed_type_at_load(None) == DistributedType.NO
    facts = machine.machine_facts()
    assert (facts.cuda, facts.local_rank, facts.num_processes, facts.flash_attn_2) == (True, 0, 1, True)
    assert facts.distributed_type == DistributedType.NO
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert machine.distributed_type_at_load(None) == DistributedType.NO
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert machine.distributed_type_at_load(None) == DistributedType.MULTI_CPU


@pytest.mark.parametrize(
    ("value", "on"),
    [("1", True), ("true", True), ("True", True), ("yes", True), ("YES", True), ("0", False), ("false", False)],
)
def test_launcher_flags_read_as_the_launcher_and_users_write_them(monkeypatch, value, on):
    from sft.train.machine import env_flag

    monkeypatch.setenv("ACCELERATE_USE_FSDP", value)
    assert env_flag("ACCELERATE_USE_FSDP") is on
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert env_flag("ACCELERATE_USE_FSDP") is False
