"""`--backend vllm`: the same greedy replies as the default backend. Runs only where vLLM and a CUDA GPU are."""

import importlib.util

import pytest
import torch

from sft.evaluation.evaluate import main

pytestmark = pytest.mark.slow  # every test here needs a training run, a server or a browser

HAS_VLLM = importlib.util.find_spec("vllm") is not None
COMMON = ["--num_samples", "8", "--max_ppl_samples", "2", "--max_new_tokens", "16", "--no_quantize", "true"]


@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU")
def test_vllm_gives_the_greedy_replies_of_the_default_backend(smoke_run, tmp_path):
    default = main(["--model_path", str(smoke_run), "--output_dir", str(tmp_path / "hf"), *COMMON])
    vllm = main(["--model_path", str(smoke_run), "--output_dir", str(tmp_path / "vllm"), "--backend", "vllm", *COMMON])
    assert vllm["settings"]["backend"] == "vllm"
    assert [s["greedy"] for s in vllm["samples"]] == [s["greedy"] for s in default["samples"]]


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_vllm_backend_without_vllm_is_one_line(smoke_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_path", str(smoke_run), "--output_dir", str(tmp_path), "--backend", "vllm"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --backend vllm needs vLLM")
