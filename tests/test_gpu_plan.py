"""The launch decisions for GPUs, driven on a CPU with the facts they read: a T4, an A100 or H100, an FSDP or
DDP launch; and `--dry_run true`, which prints them."""

import argparse
import dataclasses
import json
import os

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from helpers import SMOKE_RECIPE, fake_gpus, run_command
from safetensors.torch import save_file

from sft.common.config import parse_recipe
from sft.common.inference import read_run, without_emulated_bf16
from sft.export import merge as merge_module
from sft.train.dry_run import dry_run
from sft.train.machine import Facts, attention_for, distributed_type_at_load, machine_facts
from sft.train.plan import decide

ONE_GPU = Facts(
    cuda=True,
    capability=(9, 0),
    flash_attn_2=True,
    distributed_type=DistributedType.NO,
    num_processes=1,
    local_rank=0,
    fsdp_activation_checkpointing=False,
)
T4 = dataclasses.replace(ONE_GPU, capability=(7, 5))
H100 = ONE_GPU
DDP = dataclasses.replace(ONE_GPU, distributed_type=DistributedType.MULTI_GPU, num_processes=4, local_rank=3)
FSDP = dataclasses.replace(ONE_GPU, distributed_type=DistributedType.FSDP, num_processes=2, local_rank=1)
# lccc_base's precision and model settings on the smoke model (use_cpu only lets the bf16 recipe parse here)
LCCC_BASE_LIKE = ["--dtype", "bfloat16", "--bf16", "true", "--use_cpu", "true"]


def recipe(*flags: str):
    return parse_recipe(["--config", str(SMOKE_RECIPE), *flags])


def test_fsdp_is_known_at_load_time_from_the_launcher_or_the_training_arguments(monkeypatch):
    """Under `accelerate launch` with an FSDP config, PartialState still says MULTI_GPU when the model loads (only
    the Accelerator turns it into FSDP); the decision reads what the launcher exported instead."""
    args = recipe().training
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert distributed_type_at_load(args) == DistributedType.MULTI_CPU  # no GPU here
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    facts = machine_facts(args)
    assert facts.distributed_type == DistributedType.FSDP and facts.num_processes == 2
    assert facts.fsdp_activation_checkpointing
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert distributed_type_at_load(args) == DistributedType.DEEPSPEED


def test_fsdp_stores_4bit_weights_in_the_compute_dtype_and_lets_fsdp_place_and_checkpoint(monkeypatch):
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    r = recipe(*LCCC_BASE_LIKE)
    changes = {c.key: c for c in decide(r, FSDP)}
    assert r.model.bnb_4bit_quant_storage == "bfloat16" and "FSDP" in changes["bnb_4bit_quant_storage"].why
    assert r.training.model_init_kwargs["device_map"] is None
    # FSDP's own activation checkpointing instead of the training argument's (which the Trainer refuses beside it)
    assert not r.training.activation_checkpointing and not r.training.gradient_checkpointing
    assert changes["fsdp_activation_checkpointing"].now is True
    assert os.environ["FSDP_ACTIVATION_CHECKPOINTING"] == "true"


def test_a_t4_trains_in_fp16_not_emulated_bf16():
    """Compute capability 7.5: bf16 would run emulated (torch.cuda.is_bf16_supported() says yes), so the run takes
    fp16 compute and an fp16 compute dtype for the 4-bit weights."""
    r = recipe(*LCCC_BASE_LIKE)
    changes = {c.key: c for c in decide(r, T4)}
    assert (r.training.bf16, r.training.fp16, r.training.mixed_precision) == (False, True, "fp16")
    assert r.model.dtype == "float16" and "7.5" in changes["fp16"].why
    assert r.model.attn_implementation == "sdpa"  # FlashAttention-2 needs Ampere
    same = recipe(*LCCC_BASE_LIKE)
    decide(same, H100)
    assert same.training.bf16 and not same.training.fp16 and same.model.dtype == "bfloat16"


@pytest.fixture(scope="module")
def smoke_trainer(tiny_model, tmp_path_factory):
    from sft.data import load_conversations
    from sft.train.trainer import build_trainer

    r = recipe("--output_dir", str(tmp_path_factory.mktemp("trainer")), "--eval_strategy", "no")
    return build_trainer(r, load_conversations(r.data, r.training.seed))


@pytest.mark.slow
def test_fp16_runs_keep_the_lora_weights_in_fp32(smoke_trainer):
    """TRL casts the LoRA weights of a 4-bit model to bf16, which fp16's grad scaler cannot unscale."""
    from sft.train.trainer import keep_lora_weights_in_fp32_under_fp16

    trainable = [p for p in smoke_trainer.model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.bfloat16}  # TRL's cast, what fp16 cannot train
    smoke_trainer.args.fp16 = True  # as on a T4 (fp16 cannot be turned on in a CPU run)
    try:
        keep_lora_weights_in_fp32_under_fp16(smoke_trainer)
    finally:
        smoke_trainer.args.fp16 = False
    assert {p.dtype for p in trainable} == {torch.float32}


@pytest.mark.slow
def test_counts_known_on_the_host_are_counted_there(smoke_trainer):
    """Batch slots are known on the host: adding them never copies a Python int to the device per micro-batch."""
    batch = next(iter(smoke_trainer.get_train_dataloader()))
    model = smoke_trainer.model.train()
    with torch.no_grad():
        smoke_trainer.compute_loss(model, dict(batch))
    assert smoke_trainer.batch_slots == batch["input_ids"].numel() and isinstance(smoke_trainer.batch_slots, int)
    real, supervised = smoke_trainer.device_counts.tolist()
    assert real == int(batch["attention_mask"].sum()) and supervised == int((batch["labels"][:, 1:] != -100).sum())
    slots, real_gathered, _ = smoke_trainer.gathered_counts()[0].tolist()
    assert (slots, real_gathered) == (batch["input_ids"].numel(), real)


def test_training_time_leaves_out_evaluation_and_saving(monkeypatch):
    from sft.train import trainer as train_module

    now = iter([0.0, 1.0, 5.0, 6.0, 9.0, 10.0])  # begin, step, evaluation ends, step, save ends, step
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: next(now))
    clock = train_module.TrainingClock()
    for event in ("on_train_begin", "on_step_end", "on_evaluate", "on_step_end", "on_save", "on_step_end"):
        getattr(clock, event)(None, None, None)
    assert clock.seconds() == 10 - 4 - 3


@pytest.mark.parametrize(
    ("facts", "dtype", "attention"),
    [
        (H100, "bfloat16", "flash_attention_2"),
        (H100, "float16", "flash_attention_2"),
        (H100, "float32", "sdpa"),  # FlashAttention-2 rejects fp32 tensors: the fp32 smoke recipe on an H100
        (dataclasses.replace(H100, flash_attn_2=False), "bfloat16", "sdpa"),
        (T4, "float16", "sdpa"),
        (dataclasses.replace(H100, cuda=False, capability=None), "bfloat16", "sdpa"),
    ],
)
def test_flash_attention_2_only_for_half_precision_on_ampere_or_newer(facts, dtype, attention):
    assert attention_for(facts, dtype) == attention


def test_the_smoke_recipe_on_an_h100_with_flash_attn_keeps_sdpa():
    r = recipe()
    decide(r, H100)
    assert r.model.attn_implementation == "sdpa"


def test_one_process_takes_its_own_gpu_and_ddp_skips_the_unused_parameter_search():
    single = recipe(*LCCC_BASE_LIKE)
    decide(single, dataclasses.replace(ONE_GPU, local_rank=0))
    assert single.training.model_init_kwargs["device_map"] == {"": 0}  # not "auto": one GPU, not all of them
    ddp = recipe(*LCCC_BASE_LIKE)
    changes = {c.key for c in decide(ddp, DDP)}
    assert ddp.training.model_init_kwargs["device_map"] == {"": 3}
    assert ddp.training.ddp_find_unused_parameters is False and "ddp_find_unused_parameters" in changes
    assert ddp.training.activation_checkpointing  # DDP keeps the training argument's checkpointing
    mine = recipe(*LCCC_BASE_LIKE, "--ddp_find_unused_parameters", "true")
    decide(mine, DDP)
    assert mine.training.ddp_find_unused_parameters is True  # the recipe's choice wins


def test_one_process_on_a_machine_with_several_gpus_trains_on_one(monkeypatch):
    """Without a launcher the Trainer counts every visible GPU and would wrap the model in DataParallel, which
    SFTTrainer refuses; with the model whole on cuda:0 the process trains on that GPU alone."""
    r = recipe(*LCCC_BASE_LIKE)
    assert r.training.device.type == "cpu"  # the device setup runs here first; then the 4-GPU machine is stated
    r.training._n_gpu = 4
    changes = {c.key: c for c in decide(r, ONE_GPU)}
    assert r.training.n_gpu == 1 and changes["n_gpu"].was == 4
    assert r.training.model_init_kwargs["device_map"] == {"": 0}


def test_the_recipe_device_map_wins():
    r = recipe("--model_init_kwargs", '{"device_map": "auto"}')
    decide(r, DDP)
    assert r.training.model_init_kwargs["device_map"] == "auto"


def test_dry_run_prints_the_plan_of_an_fsdp_launch_on_t4s(tiny_model, monkeypatch):
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    facts = dataclasses.replace(FSDP, capability=(7, 5))
    plan = dry_run(recipe(*LCCC_BASE_LIKE, "--packing", "true"), facts)
    assert (plan["bf16"], plan["fp16"], plan["dtype"], plan["attn_implementation"]) == (
        False,
        True,
        "float16",
        "sdpa",
    )
    assert plan["device_map"] is None and plan["bnb_4bit_quant_storage"] == "float16"
    assert plan["distributed_type"] == "FSDP" and plan["num_processes"] == 2
    assert plan["changed"]["bnb_4bit_quant_storage"]["recipe"] is None
    assert set(plan["changed"]) >= {"bf16", "fp16", "dtype", "device_map", "activation_checkpointing"}
    assert plan["packing"] and plan["padding_free"] and plan["effective_batch"] == 8 * 1 * 2
    assert plan["peak_gpu_memory_estimate_gb"]["total"] > 0


def test_dry_run_shows_the_placement_ddp_and_attention_decisions(tiny_model):
    ddp = dry_run(recipe(*LCCC_BASE_LIKE), DDP)
    assert ddp["device_map"] == {"": 3} and ddp["ddp_find_unused_parameters"] is False
    assert ddp["attn_implementation"] == "flash_attention_2" and ddp["activation_checkpointing"]
    assert {"device_map", "ddp_find_unused_parameters", "attn_implementation"} <= set(ddp["changed"])
    smoke_on_h100 = dry_run(recipe(), H100)  # fp32: FlashAttention-2 would reject its tensors
    assert smoke_on_h100["attn_implementation"] == "sdpa" and smoke_on_h100["device_map"] == {"": 0}


@pytest.mark.slow
def test_dry_run_refuses_unsafe_packing_and_loads_and_writes_nothing(tiny_model, tmp_path):
    output_dir = tmp_path / "out"
    command = ["python", "sft/run.py", "--config", "recipes/smoke.yaml", "--dry_run", "true"]
    command += ["--packing", "true", "--packing_strategy", "wrapped", "--output_dir", str(output_dir)]
    command += ["--processed_dir", str(tmp_path / "data")]
    result = run_command(command)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = yaml.safe_load(result.stdout)
    assert plan["packing"] is False and plan["train_sampling_strategy"] == "group_by_length"
    assert "packing_strategy 'wrapped'" in plan["changed"]["packing"]["why"]
    assert plan["train_samples"] == 300 and plan["steps"] == plan["steps_per_epoch"] * 3
    assert 0 < plan["supervised_tokens_per_epoch"] < plan["tokens_per_epoch"]
    assert list(tmp_path.iterdir()) == []  # no output folder, no prepared data


@pytest.mark.parametrize("name", ["lccc_base", "lccc_seed"])
@pytest.mark.parametrize("facts", [H100, dataclasses.replace(H100, flash_attn_2=False), T4, DDP])
def test_the_real_recipes_train_packed_without_padding_on_every_gpu(name, facts):
    r = parse_recipe(["--config", f"recipes/{name}.yaml", "--use_cpu", "true"])
    decide(r, facts)
    assert r.training.packing and r.training.packing_strategy == "bfd"
    assert r.model.attn_implementation in ("flash_attention_2", "sdpa")


@pytest.mark.parametrize("visible, local_rank, gpu", [(1, "1", 0), (4, "3", 3), (2, "3", 1)])
def test_each_rank_trains_on_a_gpu_it_sees(visible, local_rank, gpu, monkeypatch):
    """A scheduler that shows each rank one GPU (CUDA_VISIBLE_DEVICES per rank) gives rank 1 only cuda:0: the
    model goes where the Accelerator puts the batches (LOCAL_RANK modulo the visible GPUs), not to cuda:1."""
    r = recipe(*LCCC_BASE_LIKE)
    asked = fake_gpus(monkeypatch, visible, (9, 0), "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    facts = machine_facts()
    assert facts.local_rank == gpu and set(asked) == {gpu}
    decide(r, facts)
    assert r.training.model_init_kwargs["device_map"] == {"": gpu}


@pytest.mark.parametrize(
    "name, capability, peak_flops",
    [("Tesla T4", (7, 5), 65e12), ("NVIDIA A100-SXM4-80GB", (8, 0), 312e12), ("NVIDIA Imaginary Z9", (12, 0), None)],
)
def test_the_gpus_name_memory_and_tabled_peak_reach_the_plan(name, capability, peak_flops, monkeypatch):
    """What `make plan` and the MFU figures read: the peak in the precision the GPU trains in (a T4 has no bf16
    entry in TRL's table: its fp16 peak), none for a GPU the table does not know."""
    fake_gpus(monkeypatch, 1, capability, name)
    facts = machine_facts()
    assert (facts.gpu_name, facts.memory_gb, facts.peak_flops) == (name, 80.0, peak_flops)
    assert machine_facts(argparse.Namespace(use_cpu=True)).gpu_name is None


def fake_run(tmp_path, recipe_dtype: str, trained_dtype: str | None):
    """A run folder as training leaves it: adapter config, recipe.yaml, and run_summary.json when finished."""
    from helpers import TINY_MODEL

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(TINY_MODEL)}))
    save_file({"lora": torch.zeros(1)}, tmp_path / "adapter_model.safetensors")  # read_run checks the weights are there
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"dtype": recipe_dtype, "bf16": True, "load_in_4bit": True}))
    if trained_dtype:
        (tmp_path / "run_summary.json").write_text(json.dumps({"dtype": trained_dtype, "global_step": 1}))
    return read_run(str(tmp_path))


def test_eval_chat_and_merge_use_the_precision_the_run_trained_in(tmp_path):
    """A bf16 recipe trained on a T4 trained in fp16 (the plan's change, recorded in run_summary.json)."""
    assert fake_run(tmp_path, "bfloat16", "float16").model_args.dtype == "float16"
    (tmp_path / "checkpoint-5").mkdir()  # a checkpoint of that run
    assert fake_run(tmp_path / "checkpoint-5", "bfloat16", None).model_args.dtype == "float16"
    (tmp_path / "unfinished" / "checkpoint-5").mkdir(parents=True)  # not known: the recipe's
    assert fake_run(tmp_path / "unfinished" / "checkpoint-5", "bfloat16", None).model_args.dtype == "bfloat16"


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_on_a_t4_inference_and_merging_use_fp16_not_emulated_bf16(capability, expected, tmp_path, monkeypatch):
    """A run whose precision is known only as bf16 (a checkpoint, or trained on an A100) loads and merges in fp16 on
    a GPU without native bf16: `torch.cuda.is_bf16_supported()` would say yes there (emulation)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(merge_module, "stored_dtype", lambda run: torch.bfloat16)
    (tmp_path / "checkpoint-5").mkdir()
    run = fake_run(tmp_path / "checkpoint-5", "bfloat16", None)
    assert merge_module.merge_dtype(run, "cuda", None) == expected
    assert without_emulated_bf16(torch.bfloat16, "cuda:0") == expected
    assert without_emulated_bf16(torch.bfloat16, "cpu") == torch.bfloat16  # CPUs: as asked
    assert without_emulated_bf16(torch.float32, "cuda") == torch.float32


def test_peak_memory_on_a_gpu_counts_torchs_peaks_and_the_paged_optimizer_beside_them(monkeypatch):
    from bitsandbytes.functional import GlobalPageManager

    from sft.train.machine import peak_memory

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3_000)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 5_000)
    paged = [torch.zeros(10, dtype=torch.float32), torch.zeros(4, dtype=torch.uint8)]
    monkeypatch.setattr(GlobalPageManager.get_instance(), "paged_tensors", paged)
    assert peak_memory(torch.device("cuda", 0)) == {
        "allocated": 3_000, "reserved": 5_000, "paged_optimizer": 44, "kind": "cuda"
    }  # fmt: skip


def test_peak_memory_on_a_cpu_is_the_processs_peak_resident_memory_in_bytes():
    from sft.train.machine import peak_memory

    memory = peak_memory(torch.device("cpu"))
    assert memory["kind"] == "process_max_rss" and memory["paged_optimizer"] == 0
    assert memory["allocated"] == memory["reserved"] > 100 * 2**20  # torch alone holds more than 100 MiB


@pytest.mark.parametrize("facts", [T4, H100, DDP, FSDP], ids=["t4", "h100", "ddp", "fsdp"])
def test_every_change_of_the_plan_says_what_the_recipe_had_and_why(facts):
    """`make plan` prints each change as was -> now, with its reason."""
    before, after = recipe(*LCCC_BASE_LIKE), recipe(*LCCC_BASE_LIKE)
    changes = decide(after, facts)
    assert changes
    for change in changes:
        assert isinstance(change.why, str) and change.why and change.was != change.now
        for part in (before.training, before.model):
            if hasattr(part, change.key) and change.key != "n_gpu":
                assert getattr(part, change.key) == change.was, change.key
        if change.key == "device_map":
            assert change.was == "TRL's default: 'auto'"


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--packing_strategy", "wrapped"], "packing_strategy 'wrapped' cuts and joins sequences"),
        (["--packing_strategy", "bfd", "--attn_implementation", "kernels-community/vllm-flash-attn3"], "is not known"),
        (["--packing_strategy", "bfd"], None),  # best-fit decreasing with SDPA keeps sequences apart: packing stays
    ],
)
def test_packing_is_kept_only_where_packed_sequences_cannot_see_each_other(flags, problem):
    r = recipe("--packing", "true", "--padding_free", "true", *flags)
    changes = {c.key: c for c in decide(r, dataclasses.replace(ONE_GPU, cuda=False, capability=None))}
    if problem is None:
        assert r.training.packing and r.training.padding_free and "packing" not in changes
        return
    assert (r.training.packing, r.training.padding_free) == (False, False)
    assert r.training.train_sampling_strategy == "group_by_length"
    assert {"packing", "padding_free", "train_sampling_strategy"} <= set(changes) and problem in changes["packing"].why


@pytest.mark.parametrize(
    "flags, filtered",
    [([], False), (["--logging_nan_inf_filter", "true"], True), (["--stop_after_bad_steps", "0"], True)],
)
def test_nan_losses_are_logged_as_they_are_while_the_watch_needs_them(flags, filtered):
    r = recipe(*flags)
    decide(r, dataclasses.replace(ONE_GPU, cuda=False, capability=None))
    assert r.training.logging_nan_inf_filter is filtered
