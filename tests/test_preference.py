"""The preference stage on real runs: reply-only scoring per family (DPO, and ORPO or its refusal), the SFT adapter
as the reference on one base, the smoke DPO and ORPO runs learning (loss falls, reward margin grows), the DPO folder
usable as an SFT run's (chat, merge; no `ref/` copy), `make eval` comparing base, SFT and DPO, and resume after
SIGKILL."""

import json
import signal
import sys

import pytest
import torch
from helpers import LAUNCH, ROOT, run_command, start_command, wait_for

pytestmark = pytest.mark.slow
DPO = [sys.executable, "-m", "sft", "dpo", "--config", "recipes/smoke_dpo.yaml"]
PAIRS = [
    {
        "prompt": [{"role": "user", "content": "周末干嘛呢"}],
        "chosen": [{"role": "assistant", "content": "去爬山了，风景很好"}],
        "rejected": [{"role": "assistant", "content": "哈哈"}],
    },
    {
        "prompt": [
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好呀"},
            {"role": "user", "content": "吃了吗"},
        ],
        "chosen": [{"role": "assistant", "content": "吃了，今天吃的面条"}],
        "rejected": [{"role": "assistant", "content": "好的好的好的好的"}],
    },
]


def reply_tokens(tokenizer, prompt: list[dict], reply: list[dict]) -> list[int]:
    """Independently: the tokens the chat template adds for the reply after the prompt's generation prompt."""
    whole = tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"]
    head = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert whole[: len(head)] == head
    return whole[len(head) :]


@pytest.mark.parametrize("family", ["llama", "qwen2_5", "llama3"])
def test_only_the_reply_tokens_of_chosen_and_rejected_are_scored(family, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from sft.common.model import TINY_MODEL_DIRS, load_tokenizer

    tokenizer = load_tokenizer(str(ROOT / TINY_MODEL_DIRS[family]))
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True)
    trainer = DPOTrainer(
        model=str(ROOT / TINY_MODEL_DIRS[family]),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
        peft_config=LoraConfig(target_modules="all-linear"),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    rows = [(p["prompt"], p["chosen"]) for p in PAIRS] + [
        (p["prompt"], p["rejected"]) for p in PAIRS
    ]  # [chosen, rejected]
    for row, (prompt, reply) in enumerate(rows):
        scored = batch["input_ids"][row][batch["completion_mask"][row].bool()].tolist()
        assert scored == reply_tokens(tokenizer, prompt, reply), (family, row)


@pytest.mark.parametrize("family", ["llama", "qwen2_5", "llama3"])
def test_orpo_scores_only_the_reply_tokens_or_is_refused(family, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from sft.common.errors import UserError
    from sft.common.model import TINY_MODEL_DIRS, load_tokenizer
    from sft.preference.trainer import check_orpo_scores_the_template_reply

    tokenizer = load_tokenizer(str(ROOT / TINY_MODEL_DIRS[family]))
    if family == "qwen2_5":  # replies end in `<|im_end|>\n`: ORPO would append a second `<|im_end|>`
        with pytest.raises(UserError, match="method: orpo needs a chat template whose replies end in the EOS"):
            check_orpo_scores_the_template_reply(tokenizer)
        return
    check_orpo_scores_the_template_reply(tokenizer)
    trainer = ORPOTrainer(
        model=str(ROOT / TINY_MODEL_DIRS[family]),
        args=ORPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True),
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
        peft_config=LoraConfig(target_modules="all-linear"),
    )
    for row, pair in zip(trainer.train_dataset, PAIRS, strict=True):
        for kind in ("chosen", "rejected"):
            scored = [token for token in row[f"{kind}_labels"] if token != -100]
            assert scored == reply_tokens(tokenizer, pair["prompt"], pair[kind]), (family, kind)


@pytest.fixture(scope="session")
def dpo_run(smoke_run, tmp_path_factory):
    """One smoke DPO run on the smoke SFT run, through the launcher, with pairs mined from it."""
    where = tmp_path_factory.mktemp("dpo")
    command = [*LAUNCH, "--config", "recipes/smoke_dpo.yaml", "--sft_run", str(smoke_run)]
    result = run_command([*command, "--output_dir", str(where / "out"), "--pairs_dir", str(where / "pairs")])
    assert result.returncode == 0, result.stderr[-3000:]
    return where


def test_smoke_dpo_loss_falls_and_the_reward_margin_grows(dpo_run):
    summary = json.loads((dpo_run / "out" / "run_summary.json").read_text())
    assert summary["global_step"] == 8
    assert summary["loss"]["last"] < summary["loss"]["first"]
    assert summary["reward_margin"]["last"] > summary["reward_margin"]["first"]
    stats = json.loads((dpo_run / "pairs" / "pairs_stats.json").read_text())
    assert stats["pairs"] + sum(stats["dropped"].values()) == stats["contexts"] == 16
    assert sum(stats["pairs_by_reason"].values()) == stats["pairs"] == summary["train_pairs"]


def test_smoke_orpo_on_the_same_pairs_learns(dpo_run, smoke_run, tmp_path):
    out = tmp_path / "out"
    command = [*DPO, "--method", "orpo", "--sft_run", str(smoke_run), "--pairs_dir", str(dpo_run / "pairs")]
    result = run_command([*command, "--output_dir", str(out), "--max_steps", "4"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["stage"] == "orpo" and summary["global_step"] == 4
    assert summary["loss"]["last"] < summary["loss"]["first"]
    assert summary["reward_margin"]["last"] > summary["reward_margin"]["first"]
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("**/ref"))


def test_a_dpo_run_loads_as_an_sft_run(dpo_run, smoke_run):
    from sft.common.inference import read_run
    from sft.serving.chat import ASSISTANT_PROMPT

    out = dpo_run / "out"
    run = read_run(str(out))
    sft = read_run(str(smoke_run))
    assert run.is_adapter and run.base_model == sft.base_model and run.data == sft.data
    for name in ("generation_config.json", "chat_template.jinja", "recipe.yaml"):
        assert (out / name).is_file(), name
    # TRL's reference adapter (a copy of the SFT run's) is not published, in the run nor in its checkpoints
    assert not list(out.glob("**/ref")) and list(out.glob("checkpoint-*/adapter_model.safetensors"))
    chat = run_command(
        [sys.executable, "-m", "sft", "chat", "--model_path", str(out), "--max_new_tokens", "4"], input="你好\n"
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.count(ASSISTANT_PROMPT) == 1 and "user> 你好\n" in chat.stdout, chat.stdout


def test_a_dpo_run_merges_into_base_plus_its_own_adapter(dpo_run, smoke_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from sft.common.inference import load_model, read_run

    merged = tmp_path / "merged"
    result = run_command(
        [sys.executable, "-m", "sft", "merge", "--model_path", str(dpo_run / "out"), "--output_dir", str(merged)]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = read_run(str(dpo_run / "out")).load_tokenizer()
    ids = tokenizer.apply_chat_template(PAIRS[1]["prompt"], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        actual = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
        dpo = load_model(read_run(str(dpo_run / "out")), quantize=False, device="cpu")(input_ids=ids).logits
        sft = load_model(read_run(str(smoke_run)), quantize=False, device="cpu")(input_ids=ids).logits
    assert (actual - dpo).abs().max().item() <= 1e-4  # test_merge.py's tolerance: float32 rounding only
    assert (actual - sft).abs().max().item() > 1e-2  # the DPO adapter, not the SFT one it started from


def test_eval_compares_base_sft_and_dpo_side_by_side(dpo_run, smoke_run, tmp_path):
    from sft.common.inference import read_run
    from sft.data import load_conversations
    from sft.data.replies import most_frequent_replies

    command = [sys.executable, "-m", "sft", "eval", "--model_path", str(dpo_run / "out"), "--compare_base"]
    small = ["--num_samples", "3", "--max_ppl_samples", "8", "--max_new_tokens", "6", "--output_dir", str(tmp_path)]
    result = run_command([*command, "--compare_runs", str(smoke_run), *small])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval_report.json").read_text(encoding="utf-8"))
    sft = report["runs"][str(smoke_run)]
    for block in (report, report["base"], sft):
        assert block["perplexity"] > 1 and block["reply_tokens"] == report["reply_tokens"]
        for decoding in ("greedy", "sampling"):
            for key in ("loop_rate", "no_stop_rate", "distinct_2"):
                assert 0 <= block[decoding][key] <= 1, (key, decoding)
        assert 0 <= block["generic_rate"] <= 1  # a diagnostic of the sampled replies
    assert len({report["perplexity"], report["base"]["perplexity"], sft["perplexity"]}) == 3  # three models
    assert [sample["runs"][str(smoke_run)] for sample in report["samples"]] == [
        sample["greedy"] for sample in json.loads(sft_report(smoke_run, small, tmp_path))["samples"]
    ]
    run = read_run(str(smoke_run))
    train = load_conversations(run.data, run.seed)["train"]["messages"]
    assert report["diagnostics"]["generic_replies"] == most_frequent_replies(train, top=20)
    assert f"| metric | fine-tuned | base | {smoke_run} |" in result.stdout
    assert "| generic replies (share), sampling |" in result.stdout


def sft_report(smoke_run, small: list[str], tmp_path) -> str:
    """`lccc-sft eval` of the SFT run alone, with the same settings, as JSON text."""
    out = tmp_path / "sft-alone"
    small = [*small[:-1], str(out)]
    result = run_command([sys.executable, "-m", "sft", "eval", "--model_path", str(smoke_run), *small])
    assert result.returncode == 0, result.stderr[-3000:]
    return (out / "eval_report.json").read_text(encoding="utf-8")


def sequence_log_probs(model, tokenizer, pair: dict) -> torch.Tensor:
    """Summed log-probabilities of the chosen reply after its prompt, computed directly."""
    prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
    reply = reply_tokens(tokenizer, pair["prompt"], pair["chosen"])
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    log_probs = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return log_probs[len(prompt) - 1 :].sum()


def test_the_reference_is_the_sft_adapter_on_the_one_base(smoke_run, tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM

    from sft.common.inference import load_model, read_run
    from sft.common.model import keep_4bit_layers_differentiable
    from sft.preference.config import parse_preference_recipe
    from sft.preference.trainer import build_preference_trainer

    loads = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a[0]) or original(*a, **k)
    )
    recipe = parse_preference_recipe(
        [
            "--config",
            "recipes/smoke_dpo.yaml",
            "--sft_run",
            str(smoke_run),
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "true",
        ]
    )
    trainer = build_preference_trainer(recipe, DatasetDict({"train": Dataset.from_list(PAIRS)}))
    assert len(loads) == 1 and trainer.ref_model is None  # one base in memory, no second model
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[0]]))
    ref_chosen, _ = trainer.compute_ref_log_probs(trainer.model, batch)

    sft = load_model(read_run(str(smoke_run)), device="cpu")
    # In eval mode without gradients, bitsandbytes runs 4-bit layers on a CPU with AVX512-BF16 through a repacked
    # bf16 kernel (bitsandbytes/nn/modules.py, Linear4bit.forward), which the trainer turns off: the SFT model
    # scored through it differs by ~1e-4 relative. Scored through the same kernel, it matches to float rounding.
    keep_4bit_layers_differentiable(sft)
    expected = sequence_log_probs(sft, read_run(str(smoke_run)).load_tokenizer(), PAIRS[0])
    with trainer.model.disable_adapter():  # the bare base, which a new adapter's reference would be
        base_chosen, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    assert ref_chosen.item() == pytest.approx(expected.item(), rel=1e-6), (ref_chosen, expected)
    assert base_chosen.item() != pytest.approx(expected.item(), rel=1e-3), "the reference is the bare base"


def test_a_dpo_run_resumes_after_sigkill(smoke_run, dpo_run, tmp_path):
    out = tmp_path / "out"
    command = [*DPO, "--sft_run", str(smoke_run), "--pairs_dir", str(dpo_run / "pairs"), "--output_dir", str(out)]
    process = start_command(command, tmp_path / "first.log")
    wait_for(lambda: (out / "checkpoint-4" / "trainer_state.json").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "run_summary.json").exists()
    second = run_command(command)
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "resuming from" in output and "checkpoint-4" in output.split("resuming from")[1].splitlines()[0]
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 8
    assert output.count("'loss':") == 4, "the rerun did not continue from the checkpoint"
