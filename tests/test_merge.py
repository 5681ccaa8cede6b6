"""`lccc-sft merge`: a standalone model whose logits match base + adapter, loadable by plain transformers."""

import json
import shutil

import pytest
import torch
from helpers import run_command
from transformers import AutoModelForCausalLM

import sft.export.merge
from sft.common.inference import encode_prompt, load_model, read_run, render_prompt

pytestmark = pytest.mark.slow  # every test here needs a training run, a server or a browser

# Merged weights W + (alpha/r)·B·A in float32 against the unmerged W·x + (alpha/r)·B·(A·x): the two differ only by
# float32 rounding, measured at about 4e-6 on logits of magnitude ~10 for the smoke model. 1e-4 leaves a wide margin
# for other CPUs and BLAS builds, and stays five orders of magnitude below what a wrong or missing merge changes
# (the adapter moves the smoke model's logits by ~10). The 4-bit base used in training differs from the unquantized
# base by quantization error (~0.6 on these logits), which is why the reference here is the unquantized base.
LOGIT_TOLERANCE = 1e-4

CONTEXTS = [
    [{"role": "user", "content": "我儿子今天会叫爸爸了！"}],
    [
        {"role": "user", "content": "吃了吗？"},
        {"role": "assistant", "content": "吃了，你呢？"},
        {"role": "user", "content": "还没有。"},
    ],
]


@pytest.fixture(scope="module")
def merged(smoke_run, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("merge") / "merged"
    result = run_command(["python", "-m", "sft.merge", "--model_path", str(smoke_run), "--output_dir", str(output_dir)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"written to {output_dir}" in result.stdout
    assert "reloaded unquantized in float32" in result.stderr  # the 4-bit base is not merged into, and it says so
    return output_dir


def test_merged_folder_is_a_standalone_safetensors_model(merged):
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    assert (merged / "tokenizer.json").is_file() and (merged / "chat_template.jinja").is_file()
    assert not (merged / "adapter_config.json").exists() and not list(merged.glob("*.bin"))
    assert "generation" not in (merged / "chat_template.jinja").read_text()  # the plain inference template
    info = json.loads((merged / "merge_info.json").read_text())
    assert info["dtype"] == "float32" and info["adapter_trained_on"].startswith("4-bit")
    assert info["probe_max_abs_logit_diff"] < LOGIT_TOLERANCE
    assert json.loads((merged / "config.json").read_text())["dtype"] == "float32"


def test_the_merged_model_keeps_the_runs_generation_settings(smoke_run, merged):
    from sft.common.generation import load_generation_defaults

    assert load_generation_defaults(merged) == load_generation_defaults(smoke_run)


def test_merged_logits_match_base_plus_adapter(smoke_run, merged):
    run = read_run(str(smoke_run))
    tokenizer = run.load_tokenizer()
    tokenizer.padding_side = "left"
    prompts = [render_prompt(tokenizer, context) for context in CONTEXTS]
    batch = encode_prompt(tokenizer, prompts, padding=True, return_tensors="pt")
    with_adapter = load_model(run, quantize=False, device="cpu")
    standalone = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        expected = with_adapter(**batch).logits
        actual = standalone(**batch).logits
        with with_adapter.disable_adapter():
            base_only = with_adapter(**batch).logits
    real = batch["attention_mask"].bool()
    assert (actual - expected)[real].abs().max().item() <= LOGIT_TOLERANCE
    assert (base_only - expected)[real].abs().max().item() > 100 * LOGIT_TOLERANCE  # the adapter did change things


PIPELINE_WITHOUT_PEFT = """
import json, sys
sys.modules["peft"] = None  # peft cannot be imported: the merged model must not need it
from transformers import AutoModelForCausalLM, pipeline
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
generate = pipeline("text-generation", model=sys.argv[1])
chat = [{"role": "user", "content": "你好"}]
messages = generate(chat, max_new_tokens=5, do_sample=False)[0]["generated_text"]
ids = generate(chat, max_new_tokens=5, min_new_tokens=5, do_sample=False, return_tensors=True)[0]
prompt = generate.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
result = {"model": type(model).__name__, "messages": messages, "prompt": prompt, "tokens": ids["generated_token_ids"]}
print(json.dumps(result, ensure_ascii=False))
"""


def test_pipeline_generates_from_the_merged_model_without_peft(merged):
    result = run_command(["python", "-c", PIPELINE_WITHOUT_PEFT, str(merged)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["model"] == "LlamaForCausalLM"
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"]
    assert out["tokens"][: len(out["prompt"])] == out["prompt"] and len(out["tokens"]) == len(out["prompt"]) + 5


def test_merge_refuses_to_overwrite_the_adapter_or_merge_a_merged_model(smoke_run, merged, capsys):
    for argv, message in [
        (["--model_path", str(smoke_run), "--output_dir", str(smoke_run)], "must lie outside --model_path"),
        (["--model_path", str(smoke_run), "--output_dir", str(merged)], "exists and is not empty"),
        (["--model_path", str(merged), "--output_dir", str(merged) + "-again"], "nothing to merge"),
        (["--model_path", str(smoke_run), "--output_dir", str(smoke_run.parent), "--overwrite"], "only an earlier"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            sft.export.merge.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_merge_dtype_half_on_gpu_own_dtype_on_cpu_or_for_float32(smoke_run, monkeypatch):
    run = read_run(str(smoke_run))  # the smoke base is float32, its recipe's dtype float32
    assert sft.export.merge.merge_dtype(run, "cpu", None) == torch.float32
    assert sft.export.merge.merge_dtype(run, "cuda", None) == torch.float32
    assert sft.export.merge.merge_dtype(run, "cpu", "bfloat16") == torch.bfloat16
    monkeypatch.setattr(sft.export.merge, "stored_dtype", lambda run: torch.float16)  # a Llama-2 checkpoint
    assert sft.export.merge.merge_dtype(run, "cpu", None) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert sft.export.merge.merge_dtype(run, "cuda", None) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: bf16 only emulated
    assert sft.export.merge.merge_dtype(run, "cuda", None) == torch.float16


def test_overwrite_replaces_an_earlier_merge(smoke_run, merged, tmp_path):
    earlier = tmp_path / "earlier"
    shutil.copytree(merged, earlier)
    (earlier / "stale.txt").write_text("left from an earlier merge")
    info = sft.export.merge.main(
        ["--model_path", str(smoke_run), "--output_dir", str(earlier), "--overwrite", "--device", "cpu"]
    )
    assert not (earlier / "stale.txt").exists() and (earlier / "model.safetensors").is_file()
    assert json.loads((earlier / "merge_info.json").read_text()) == info
