"""Every user mistake ends with one clear message and exit code 2, never a traceback (README's table)."""

import httpx
import pytest
import torch
from helpers import SMOKE_RECIPE
from huggingface_hub.errors import GatedRepoError
from transformers import AutoConfig, AutoTokenizer

from sft.common.errors import UserError
from sft.common.template import training_chat_template
from sft.train.launch import main


def run_main(capsys, *argv: str) -> str:
    """Run the launcher in-process; return its one-line error message."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


def smoke(*overrides: str) -> list[str]:
    return ["--config", str(SMOKE_RECIPE), *overrides]


def test_missing_recipe(capsys):
    assert run_main(capsys, "--config", "recipes/nope.yaml") == "error: recipe file not found: recipes/nope.yaml"


def test_yaml_syntax_error_names_the_line(capsys, tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("lora_r: 8\nlearning_rate: [2.0e-4\nseed: 1\n")
    assert "is not valid YAML at line 3" in run_main(capsys, "--config", str(recipe))


def test_empty_recipe_says_it_is_empty(capsys, tmp_path):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("# nothing yet\n")
    assert run_main(capsys, "--config", str(recipe)) == f"error: recipe {recipe} is empty: give at least " + (
        "`model_name_or_path` and `dataset_name`"
    )


def test_output_dir_that_cannot_be_created(capsys, tiny_model):
    message = run_main(capsys, *smoke("--output_dir", "/proc/no-such-dir/out", "--max_steps", "1"))
    assert message == "error: cannot use output_dir /proc/no-such-dir/out: No such file or directory"


def test_lora_target_modules_matching_no_module(capsys, tiny_model, tmp_path):
    message = run_main(capsys, *smoke("--output_dir", str(tmp_path / "out"), "--lora_target_modules", "qkv", "fc9"))
    assert message.startswith("error: lora_target_modules ['qkv', 'fc9'] name no module of build/tiny-llama;")


def test_unknown_key_names_the_closest(capsys):
    message = run_main(capsys, *smoke("--lora_alfa", "8"))
    assert message == "error: unknown option `--lora_alfa` (did you mean `lora_alpha`?)"


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--learning_rate=-1e-4", "`learning_rate` must be a positive number, got -0.0001"),
        ("--lora_r=0", "`lora_r` must be at least 1, got 0"),
        ("--lora_r=eight", "argument --lora_r/--lora-r: invalid int value: 'eight'"),
    ],
)
def test_wrong_type_or_impossible_value(capsys, flag, expected):
    assert expected in run_main(capsys, *smoke(flag))


def test_max_length_shorter_than_one_turn(capsys, tiny_model, tmp_path):
    message = run_main(capsys, *smoke("--max_length", "8", "--output_dir", str(tmp_path / "out")))
    assert "max_length 8 is shorter than one turn" in message


def test_missing_local_dataset(capsys):
    assert "data/missing.json" in run_main(capsys, *smoke("--dataset_name", "data/missing.json"))


def test_model_that_is_neither_a_folder_nor_a_hub_id(capsys):
    message = run_main(capsys, *smoke("--model_name_or_path", "./models/llama"))
    assert message == "error: model './models/llama' is neither a local folder nor a Hub id like `org/name`"


def test_gated_model_without_a_token_says_how_to_get_access(capsys, monkeypatch, tmp_path):
    def gated(*args, **kwargs):
        response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/meta-llama"))
        try:
            raise GatedRepoError("401 Client Error: access is restricted", response=response)
        except GatedRepoError as err:
            raise OSError("You are trying to access a gated repo.") from err

    monkeypatch.setattr(AutoConfig, "from_pretrained", gated)  # the launch plan reads the config first
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", gated)
    message = run_main(
        capsys, *smoke("--model_name_or_path", "meta-llama/Llama-2-7b-chat-hf", "--output_dir", str(tmp_path))
    )
    assert "meta-llama/Llama-2-7b-chat-hf is a gated model" in message
    assert "https://huggingface.co/meta-llama/Llama-2-7b-chat-hf" in message and "huggingface-cli login" in message


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.is_bf16_supported(), reason="this machine has bf16")
def test_bf16_on_hardware_without_it_suggests_alternatives(capsys):
    message = run_main(capsys, *smoke("--bf16", "true"))
    assert "no bf16 support" in message and "--bf16 false" in message and "fp16" in message


def test_cuda_out_of_memory_gives_the_faq_advice(capsys, monkeypatch, tiny_model, tmp_path):
    from sft.train.trainer import CountingSFTTrainer

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(CountingSFTTrainer, "train", out_of_memory)
    message = run_main(capsys, *smoke("--output_dir", str(tmp_path / "out")))
    assert "CUDA ran out of memory" in message
    assert "--per_device_train_batch_size 1 --gradient_accumulation_steps 16" in message


def test_tokenizer_without_chat_template(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="no chat template; give one with `chat_template_path"):
        training_chat_template(tokenizer)


def test_template_whose_replies_have_no_end_of_turn_is_refused(tiny_model):
    from sft.common.template import derived_reply_mask

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert training_chat_template(tokenizer) == tokenizer.chat_template  # no training form: spans are derived
    turns = [
        {"role": r, "content": c}
        for r, c in [("user", "你好"), ("assistant", "好"), ("user", "嗯"), ("assistant", "对")]
    ]
    with pytest.raises(UserError, match="ends a reply with no end-of-turn token '</s>'.*`chat_template_path`"):
        derived_reply_mask(tokenizer, turns)


def test_trust_remote_code_is_off_unless_asked_and_announced(caplog):
    from sft.common.config import parse_recipe
    from sft.common.model import model_init_kwargs

    recipe = parse_recipe(smoke())
    assert model_init_kwargs(recipe.model, recipe.training)["trust_remote_code"] is False
    recipe = parse_recipe(smoke("--trust_remote_code", "true"))
    assert model_init_kwargs(recipe.model, recipe.training)["trust_remote_code"] is True
    assert "trust_remote_code is ON" in caplog.text


def test_the_smoke_model_not_built_yet_says_how_to_build_it(monkeypatch, tmp_path):
    from sft.common.model import check_model_source

    monkeypatch.chdir(tmp_path)  # no build/ folder here
    with pytest.raises(UserError, match="make tiny-model"):
        check_model_source("build/tiny-llama")


def test_an_output_dir_that_cannot_be_created(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    message = run_main(capsys, *smoke("--output_dir", str(blocker / "out")))
    assert message == f"error: cannot use output_dir {blocker / 'out'}: {blocker} is a file, not a folder"
