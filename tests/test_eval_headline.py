"""What eval reports: headline metrics from the sampled replies, the most repetitive replies first, and `--seed`."""

import shutil

import pytest
import yaml

from sft.common.generation import GenerationArguments
from sft.common.inference import TrainedModelArguments
from sft.evaluation import evaluate as eval_module
from sft.evaluation.batch_generation import Generated, Reply
from sft.evaluation.diagnostics import DiagnosticInputs
from sft.evaluation.evaluate import WORST_REPLIES, EvalArguments, evaluate, evaluate_model, most_repetitive

CONTEXTS = [[{"role": "user", "content": "你好"}], [{"role": "user", "content": "在吗"}]]
REFERENCES = ["你好呀", "在的"]


class Replies:
    """Stands in for the vLLM engine: greedy and sampled replies that score differently."""

    def generate(self, tokenizer, contexts, generation, sample, adapter):
        text = "你好呀你好呀，今天天气很好" if sample else "嗯"
        return Generated([Reply(text, tokens=len(text), stopped=True) for _ in contexts], seconds=1.0)


@pytest.mark.slow  # loads the `evaluate` metric modules: several seconds
def test_the_headline_metrics_are_those_of_the_sampled_replies(monkeypatch):
    """As the LCCC paper's; the top-level values are report["sampling"]'s, not report["greedy"]'s."""
    monkeypatch.setattr(eval_module, "reply_perplexity", lambda *args: {"perplexity": 12.5})
    settings = {"max_length": 64, "batch_size": 2, "last_reply_only": False}
    no_diagnostics = DiagnosticInputs(generic=None, dialogues=[], system_prompt=None, limit=3)
    result = evaluate_model(
        None, None, [], CONTEXTS, REFERENCES, settings, GenerationArguments(), "fine-tuned", no_diagnostics, Replies()
    )
    metrics = result["metrics"]
    assert metrics["perplexity"] == 12.5
    differing = [key for key in metrics["sampling"] if metrics["sampling"][key] != metrics["greedy"][key]]
    assert {"bleu_2", "avg_len"} <= set(differing), differing
    assert all(metrics[key] == metrics["sampling"][key] for key in metrics["sampling"])
    assert eval_module.HEADLINE_DECODING == "sampling"


def test_the_worst_replies_are_the_most_repetitive_then_those_that_never_stopped():
    rates = [0.1, 0.9, 0.5, 0.5, 0.0, 0.7] + [0.05] * WORST_REPLIES
    worst = [{"repeated_ngram_rate": rate, "stopped": i != 3, "reply": str(i)} for i, rate in enumerate(rates)]
    ranked = most_repetitive(worst)
    assert len(ranked) == WORST_REPLIES
    assert [entry["reply"] for entry in ranked[:5]] == ["1", "5", "3", "2", "0"]
    assert [entry["repeated_ngram_rate"] for entry in ranked] == sorted(rates, reverse=True)[:WORST_REPLIES]


@pytest.fixture(scope="module")
def run_folder(tiny_model, tmp_path_factory):
    """The tiny model as a merged run's folder whose recipe names the shipped LCCC sample and seed 7."""
    folder = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(tiny_model, folder)
    recipe = {"dataset_name": "sft/assets/lccc_sample.json", "processed_dir": str(folder.parent / "data"), "seed": 7}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def sampled_replies(run_folder, tmp_path, seed: int | None) -> tuple[int, list[str]]:
    args = EvalArguments(num_samples=3, max_ppl_samples=2, num_examples=0, output_dir=str(tmp_path))
    generation = GenerationArguments(max_new_tokens=6, seed=seed)
    report = evaluate(TrainedModelArguments(model_path=str(run_folder)), args, generation)
    return report["settings"]["seed"], [sample["sampled"] for sample in report["samples"]]


@pytest.mark.slow
def test_eval_samples_with_the_seed_given_else_the_runs(run_folder, tmp_path):
    seed, first = sampled_replies(run_folder, tmp_path, 3)
    assert seed == 3 and sampled_replies(run_folder, tmp_path, 3) == (3, first)
    assert sampled_replies(run_folder, tmp_path, 4)[1] != first
    assert sampled_replies(run_folder, tmp_path, None)[0] == 7
