"""`lccc-sft select`: the checkpoint kept within a forgetting budget, the tightest constraint named, the cache."""

import json
import sys

import pytest
from helpers import LAUNCH, run_command

from sft.common.errors import UserError
from sft.common.inference import TrainedModelArguments
from sft.evaluation.select import CAPPED, SelectArguments, choose


def entry(step: int, loss: dict, knowledge: float, echo: float) -> dict:
    return {"step": step, "scores": {"loss": loss, "knowledge": {"quiz": knowledge}, "echo_rate": echo}}


# A mixture's run: lccc is the target, alpaca the general data. The last checkpoint learned most lccc but forgot.
SCORED = {
    "base": entry(0, {"lccc": 4.0, "alpaca": 2.0}, 0.50, 0.0),
    "checkpoint-10": entry(10, {"lccc": 3.0, "alpaca": 2.02}, 0.50, 0.1),
    "checkpoint-20": entry(20, {"lccc": 2.5, "alpaca": 2.08}, 0.495, 0.3),
    "checkpoint-30": entry(30, {"lccc": 2.0, "alpaca": 2.20}, 0.45, 0.1),
}


def test_the_best_checkpoint_within_the_budget_is_kept():
    assert choose(SCORED, SelectArguments())["selected"] == "checkpoint-30"  # no budget: lowest lccc loss
    choice = choose(SCORED, SelectArguments(max_loss_increase=0.05, max_knowledge_drop=1, knowledge=["quiz"]))
    assert choice["selected"] == "checkpoint-20"
    assert choice["target_sources"] == ["lccc"] and choice["general_sources"] == ["alpaca"]
    assert choice["checkpoints"]["checkpoint-30"]["outside_budget"] == [
        "knowledge `quiz` at most 1 points below base",
        "`alpaca` loss at most 5% above base",
    ]
    assert choose(SCORED, SelectArguments(max_echo_rate=0.2))["selected"] == "checkpoint-30"
    assert choose(SCORED, SelectArguments(max_echo_rate=0.05, max_loss_increase=0.5))["selected"] is None


def test_when_none_meets_the_budget_the_tightest_constraint_and_the_weight_to_raise_are_named():
    choice = choose(SCORED, SelectArguments(max_loss_increase=0.005, max_knowledge_drop=1, knowledge=["quiz"]))
    assert choice["selected"] is None
    # The loss budget rejects all three checkpoints, the knowledge budget only one.
    assert "tightest constraint is `alpaca` loss at most 0% above base (it rejects 3 of 3)" in choice["reason"]
    assert "raise the `weight` of `alpaca`" in choice["reason"]
    choice = choose(SCORED, SelectArguments(max_knowledge_drop=-1, knowledge=["quiz"], max_echo_rate=0.2))
    assert "tightest constraint is knowledge `quiz` at most -1 points below base" in choice["reason"]
    assert "the general sources (alpaca)" in choice["reason"]


def test_an_unknown_general_source_is_one_line():
    with pytest.raises(UserError, match="the run's sources are lccc, alpaca"):
        choose(SCORED, SelectArguments(general_sources=["wiki"]))


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model, tmp_path_factory):
    """A smoke run of one epoch that saves a checkpoint every 10 steps."""
    output_dir = tmp_path_factory.mktemp("checkpointed") / "out"
    flags = ["--num_train_epochs", "1", "--save_steps", "10", "--save_total_limit", "10", "--eval_steps", "20"]
    result = run_command([*LAUNCH, "--config", "recipes/smoke.yaml", "--output_dir", str(output_dir), *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="module")
def quiz_tasks(tmp_path_factory) -> str:
    """The local lm-eval quiz of tests/test_knowledge.py (four questions, four choices)."""
    from test_knowledge import QUESTIONS, TASK

    folder = tmp_path_factory.mktemp("quiz")
    data = folder / "questions.jsonl"
    data.write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in QUESTIONS) + "\n", encoding="utf-8")
    choices, target = '["A", "B", "C", "D"]', "{{['A', 'B', 'C', 'D'].index(Answer)}}"
    (folder / "quiz.yaml").write_text(TASK.format(name="quiz", data=data, choices=choices, target=target))
    return str(folder)


def select(run, quiz_tasks: str, *budget: str):
    small = ["--num_samples", "4", "--max_ppl_samples", "16", "--num_dialogues", "2", "--max_new_tokens", "6"]
    knowledge = ["--knowledge", "quiz", "--knowledge_tasks_dir", quiz_tasks]
    return run_command([sys.executable, "-m", "sft", "select", "--model_path", str(run), *small, *knowledge, *budget])


def budget_against(scores: dict, last: str) -> list[str]:
    """A budget flag the last checkpoint breaks and an earlier one meets, from the checkpoints' real scores."""
    others = [entry for name, entry in scores.items() if name not in ("base", last)]
    base = scores["base"]["scores"]["knowledge"]["quiz"]
    drops = {name: 100 * (base - entry["scores"]["knowledge"]["quiz"]) for name, entry in scores.items()}
    if drops[last] > min(drops[name] for name in scores if name not in ("base", last)):
        return ["--max_knowledge_drop", str(min(drops[name] for name in scores if name not in ("base", last)))]
    for key, flag in CAPPED.items():
        best = min(entry["scores"][key] for entry in others)
        if scores[last]["scores"][key] > best:
            return [f"--{flag}", str(best)]
    raise AssertionError(f"the last checkpoint is best on every score: {scores}")


@pytest.mark.slow
def test_select_on_the_smoke_runs_checkpoints(checkpointed_run, quiz_tasks):
    checkpoints = sorted((p.name for p in checkpointed_run.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))
    assert len(checkpoints) >= 3
    first = select(checkpointed_run, quiz_tasks)
    assert first.returncode == 0, first.stderr[-3000:]
    selection = checkpointed_run / "selection"
    choice = json.loads((selection / "selection.json").read_text(encoding="utf-8"))
    assert sorted(choice["scored_now"]) == sorted(["base", *checkpoints])  # the final adapter is the last checkpoint
    scores = json.loads((selection / "scores.json").read_text(encoding="utf-8"))["scores"]
    losses = {name: entry["scores"]["loss"]["lccc_sample"] for name, entry in scores.items()}
    assert choice["selected"] == min(checkpoints, key=losses.get)
    assert (selection / "selection.png").is_file() and "| checkpoint-10 |" in (selection / "selection.md").read_text()

    # A budget the last checkpoint breaks: an earlier one is kept, the best of those within it; nothing is rescored.
    last = checkpoints[-1]
    flags = budget_against(scores, last)
    kept = select(checkpointed_run, quiz_tasks, *flags)
    assert kept.returncode == 0, kept.stderr[-3000:]
    choice = json.loads((selection / "selection.json").read_text(encoding="utf-8"))
    within = [name for name in checkpoints if not choice["checkpoints"][name]["outside_budget"]]
    assert last not in within and choice["selected"] == min(within, key=losses.get)
    assert choice["scored_now"] == []

    # A budget no checkpoint meets: one error line naming the tightest constraint.
    none = select(checkpointed_run, quiz_tasks, "--max_loss_increase", "-0.9", *flags)
    assert none.returncode == 2
    assert "tightest constraint is `lccc_sample` loss at most -90% above base" in none.stderr
    assert "mix general data into it" in none.stderr and "Traceback" not in none.stderr
    assert json.loads((selection / "selection.json").read_text(encoding="utf-8"))["selected"] is None

    # merge, serve and export-gguf take the kept checkpoint with one argument.
    assert select(checkpointed_run, quiz_tasks, *flags).returncode == 0
    where = TrainedModelArguments(model_path=str(checkpointed_run), checkpoint="selected")
    assert where.model_path == str(checkpointed_run / choice["selected"])


def test_one_argument_names_the_checkpoint_the_later_commands_take(tmp_path):
    from sft.common.generation import GenerationArguments, load_generation_defaults
    from sft.export.merge import MergeArguments

    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-5" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="run `lccc-sft select --model_path"):
        TrainedModelArguments(model_path=str(run), checkpoint="selected")
    (run / "selection").mkdir()
    (run / "selection" / "selection.json").write_text(json.dumps({"selected": "checkpoint-5"}))
    assert TrainedModelArguments(model_path=str(run), checkpoint="selected").model_path == str(run / "checkpoint-5")
    assert MergeArguments(model_path=str(run), checkpoint="selected").model_path == str(run / "checkpoint-5")
    assert TrainedModelArguments(model_path=str(run), checkpoint="final").model_path == str(run)
    with pytest.raises(UserError, match="checkpoint-7 holds no adapter"):
        TrainedModelArguments(model_path=str(run), checkpoint="checkpoint-7")
    (run / "selection" / "selection.json").write_text(json.dumps({"selected": None}))
    with pytest.raises(UserError, match="no checkpoint met the forgetting budget"):
        MergeArguments(model_path=str(run), checkpoint="selected")
    # A checkpoint generates with the run's saved settings.
    (run / "generation_config.json").write_text(json.dumps({"top_p": 0.8, "temperature": 0.5}))
    assert load_generation_defaults(run / "checkpoint-5") == GenerationArguments(top_p=0.8, temperature=0.5)


def test_select_help_lists_the_budget(capsys):
    from sft.evaluation.select import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "--max_loss_increase" in printed and "5 percent" in printed and "--max_knowledge_drop" in printed
