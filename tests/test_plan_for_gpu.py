"""`lccc-sft plan --gpu NAME` (`make plan GPU=NAME`): a plan made on a CPU with a named GPU's facts, whether the
run fits its memory, and an epoch estimate from the published MFU anchor."""

import dataclasses
import json
import shutil
import sys

import pytest
import yaml
from helpers import SMOKE_RECIPE, run_command
from test_gpu_plan import FSDP, LCCC_BASE_LIKE, ONE_GPU, recipe

from sft.common.config import RunArguments, parse_recipe
from sft.common.errors import UserError
from sft.train.dry_run import dry_run, planned_facts
from sft.train.gpus import ANCHORS, GPUS, LLAMA2_7B, flops_per_token, gpu_facts, named_gpu, published_mfu
from sft.train.plan import decide

# lccc_base's settings on the smoke model and the shipped sample
LCCC_BASE_ON_SAMPLE = ["--config", "recipes/lccc_base.yaml", "--dataset_name", "sft/assets/lccc_sample.json"]
LCCC_BASE_ON_SAMPLE += ["--dataset_config", "none", "--max_train_samples", "300"]


def plan_for(gpu: str, *flags: str) -> dict:
    recipe = parse_recipe([*LCCC_BASE_ON_SAMPLE, "--gpu", gpu, *flags])
    return dry_run(recipe)


@pytest.fixture(scope="module")
def llama2_7b_shaped(tiny_model, tmp_path_factory):
    """The smoke model's tokenizer with Llama-2-7B's config: a plan reads only the config and the tokenizer."""
    folder = tmp_path_factory.mktemp("llama2-7b-shape")
    for name in tiny_model.iterdir():
        if name.is_file() and not name.name.endswith(".safetensors"):
            shutil.copy(name, folder / name.name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **LLAMA2_7B}))
    return folder


def test_the_help_names_every_gpu_of_the_table():
    help_text = RunArguments.__dataclass_fields__["gpu"].metadata["help"]
    assert all(name in help_text for name in GPUS)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "bf16", "dtype"),
    [
        ("T4", False, "float16"),  # 7.5: no native bf16
        ("A100", True, "bfloat16"),  # exactly 8.0: native bf16
        ("a100-40gb", True, "bfloat16"),
        ("L4", True, "bfloat16"),
        ("A10", True, "bfloat16"),
        ("4090", True, "bfloat16"),
        ("H100", True, "bfloat16"),
        ("H200", True, "bfloat16"),
    ],
)
def test_a_named_gpu_drives_the_launch_decisions(name, bf16, dtype, tiny_model):
    plan = plan_for(name, "--model_name_or_path", str(tiny_model))
    assert (plan["bf16"], plan["fp16"], plan["dtype"]) == (bf16, not bf16, dtype)
    assert plan["device_map"] == {"": 0} and plan["attn_implementation"] == "sdpa"  # flash-attn not assumed
    assert plan["gpu_memory_fit"]["gpu"] == named_gpu(name).device_name


def test_an_unknown_gpu_name_lists_the_known_ones():
    recipe = parse_recipe([*LCCC_BASE_ON_SAMPLE, "--gpu", "V99"])
    with pytest.raises(UserError, match="unknown GPU 'V99'; choose from T4, L4"):
        planned_facts(recipe)


def test_the_published_figures_imply_their_mfu():
    """LLaMA-Factory's A100 figures with our FLOPs formula (frozen 4 N, LoRA r=8 6 N, attention over 1024 tokens)
    and the A100's 312 TFLOPS: 2,415 tokens/s is 21.8% MFU, 3,726 is 33.6%."""
    flops = flops_per_token(LLAMA2_7B, 8, 1024)
    assert published_mfu(ANCHORS[0]) == pytest.approx(2415 * flops / 312e12) == pytest.approx(0.218, abs=1e-3)
    assert published_mfu(ANCHORS[1]) == pytest.approx(0.336, abs=1e-3)


@pytest.mark.slow
def test_llama2_7b_fits_a_t4_with_lccc_base_and_the_epoch_estimate_is_its_arithmetic(llama2_7b_shaped):
    plan = plan_for("T4", "--model_name_or_path", str(llama2_7b_shaped))
    fit, memory = plan["gpu_memory_fit"], plan["peak_gpu_memory_estimate_gb"]
    assert fit["fits"] and fit["memory_gb"] == GPUS["T4"].memory_gb == 16.1
    assert fit["margin_gb"] == pytest.approx(16.1 - memory["total"], abs=0.05) and 5 < memory["total"] < 9
    estimate = plan["epoch_time_estimate"]
    # packed padding-free rows: the micro-batch of 2 rows x 512 tokens is one sequence for SDPA
    assert plan["attended_length"] == 2 * 512
    flops = flops_per_token(LLAMA2_7B, 64, 1024)
    tokens_per_s = published_mfu(ANCHORS[0]) * 65e12 / flops
    assert estimate["model_flops_per_token"] == round(flops)
    assert estimate["tokens_per_s_per_gpu"] == round(tokens_per_s)
    hours = plan["computed_tokens_per_epoch"] / tokens_per_s / 3600
    assert estimate["hours_per_epoch"] == round(hours, 2)
    assert "LLaMA-Factory" in estimate["mfu_source"] and "no GPU figures of our own" in estimate["mfu_source"]
    on_h100 = plan_for("H100", "--model_name_or_path", str(llama2_7b_shaped))["epoch_time_estimate"]
    assert on_h100["tokens_per_s_per_gpu"] == pytest.approx(tokens_per_s * 989 / 65, rel=1e-3)


@pytest.mark.slow
def test_a_run_too_large_for_the_gpu_says_by_how_much(llama2_7b_shaped):
    large = ("--model_name_or_path", str(llama2_7b_shaped), "--max_length", "4096")
    large += ("--per_device_train_batch_size", "8")
    plan = plan_for("T4", *large)
    fit = plan["gpu_memory_fit"]
    assert not fit["fits"] and fit["margin_gb"] == pytest.approx(16.1 - plan["peak_gpu_memory_estimate_gb"]["total"])
    assert fit["margin_gb"] < 0
    assert plan_for("H200", *large)["gpu_memory_fit"]["fits"]


@pytest.mark.slow
def test_this_machines_own_facts_give_no_gpu_estimate_without_a_gpu(tiny_model):
    plan = dry_run(parse_recipe(["--config", str(SMOKE_RECIPE)]), ONE_GPU)  # a GPU of unknown name and memory
    assert plan["gpu_memory_fit"] is None and plan["epoch_time_estimate"] is None


@pytest.mark.slow
def test_make_plan_with_a_gpu_runs_the_bf16_recipe_on_a_cpu_and_without_says_what_to_pass(tiny_model, tmp_path):
    command = [sys.executable, "-m", "sft", "plan", *LCCC_BASE_ON_SAMPLE, "--model_name_or_path", str(tiny_model)]
    command += ["--processed_dir", str(tmp_path / "data")]
    planned = run_command([*command, "--gpu", "A100"])
    assert planned.returncode == 0, planned.stderr[-3000:]
    plan = yaml.safe_load(planned.stdout)
    assert plan["bf16"] and plan["gpu_memory_fit"]["gpu"] == "NVIDIA A100-SXM4-80GB"
    if not __import__("torch").cuda.is_available():
        refused = run_command(command)
        assert refused.returncode == 2
        assert "lccc-sft plan --gpu NAME" in refused.stderr and "Traceback" not in refused.stderr


def test_fsdp_is_refused_on_cpus_where_accelerate_would_train_plain_ddp():
    with pytest.raises(UserError, match="FSDP needs GPUs.*--gpu NAME"):
        decide(recipe(), dataclasses.replace(FSDP, cuda=False, capability=None))


def test_an_fsdp2_plan_for_two_a100s_stores_4bit_weights_in_bf16(monkeypatch):
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    r = recipe(*LCCC_BASE_LIKE)
    decide(r, gpu_facts(named_gpu("A100"), dataclasses.replace(FSDP, cuda=False, capability=None)))
    assert r.model.bnb_4bit_quant_storage == "bfloat16" and r.training.model_init_kwargs["device_map"] is None


def test_packed_rows_without_flash_attention_take_the_attention_the_figures_chose(monkeypatch):
    """The rule is data (PACKED_ATTENTION_WITHOUT_FA2): SDPA until GPU figures show flex_attention faster."""
    from sft.train import machine

    t4 = gpu_facts(named_gpu("T4"), ONE_GPU)
    packed, padded = recipe(*LCCC_BASE_LIKE, "--packing", "true"), recipe(*LCCC_BASE_LIKE, "--packing", "false")
    decide(packed, t4)
    assert packed.model.attn_implementation == "sdpa"
    monkeypatch.setitem(machine.PACKED_ATTENTION_WITHOUT_FA2, "cuda", "flex_attention")
    packed = recipe(*LCCC_BASE_LIKE, "--packing", "true")
    decide(packed, t4)
    decide(padded, t4)
    assert packed.model.attn_implementation == "flex_attention" and packed.training.packing
    assert padded.model.attn_implementation == "sdpa"
    on_h100 = recipe(*LCCC_BASE_LIKE, "--packing", "true")
    decide(on_h100, dataclasses.replace(ONE_GPU, flash_attn_2=True))
    assert on_h100.model.attn_implementation == "flash_attention_2"
