"""`make eval ARGS="--knowledge ..."`: base and fine-tuned accuracy through lm-eval, on local tasks written here."""

import json

import pytest

from sft.evaluation.evaluate import main

pytestmark = pytest.mark.slow  # every test here needs a training run, a server or a browser

pytest.importorskip("lm_eval", reason='the knowledge check needs the knowledge extra: pip install -e ".[knowledge]"')

QUESTIONS = [
    {"Question": "中国的首都是哪里？", "A": "上海", "B": "北京", "C": "广州", "D": "深圳", "Answer": "B"},
    {"Question": "一年有几个月？", "A": "十个", "B": "十一个", "C": "十二个", "D": "十三个", "Answer": "C"},
    {"Question": "水在零度会怎样？", "A": "结冰", "B": "沸腾", "C": "燃烧", "D": "消失", "Answer": "A"},
    {"Question": "熊猫最爱吃什么？", "A": "鱼", "B": "肉", "C": "米饭", "D": "竹子", "Answer": "D"},
]
# CMMLU's prompt and scoring (lm_eval/tasks/cmmlu/_default_template_yaml), on a local JSON file.
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{Question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: {choices}
doc_to_target: "{target}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


@pytest.fixture
def tasks_dir(tmp_path):
    """Two lm-eval tasks on four questions: CMMLU's four choices, and only the right answer to choose from."""
    data = tmp_path / "questions.jsonl"
    data.write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in QUESTIONS) + "\n", encoding="utf-8")
    folder = tmp_path / "tasks"
    folder.mkdir()
    four = TASK.format(
        name="quiz", data=data, choices='["A", "B", "C", "D"]', target="{{['A', 'B', 'C', 'D'].index(Answer)}}"
    )
    (folder / "quiz.yaml").write_text(four, encoding="utf-8")
    one = TASK.format(name="quiz_answer_only", data=data, choices='"{{[Answer]}}"', target="0")
    (folder / "quiz_answer_only.yaml").write_text(one, encoding="utf-8")
    return folder


def test_knowledge_check_scores_base_and_fine_tuned(smoke_run, tasks_dir, tmp_path):
    knowledge = ["--knowledge", "quiz", "quiz_answer_only", "--knowledge_tasks_dir", str(tasks_dir)]
    small = ["--num_samples", "2", "--max_ppl_samples", "2", "--max_new_tokens", "3"]
    main(["--model_path", str(smoke_run), "--output_dir", str(tmp_path), *small, *knowledge])
    report = json.loads((tmp_path / "eval_report.json").read_text(encoding="utf-8"))
    accuracy = report["knowledge"]["accuracy"]
    assert report["knowledge"]["tasks"] == ["quiz", "quiz_answer_only"] and "base" in report
    # With only the right answer to choose, both models are always right.
    assert accuracy["quiz_answer_only"] == {"fine-tuned": 1.0, "base": 1.0, "difference": 0.0}
    quiz = accuracy["quiz"]
    for model in ("fine-tuned", "base"):
        assert quiz[model] * len(QUESTIONS) == pytest.approx(round(quiz[model] * len(QUESTIONS)))
    assert quiz["difference"] == pytest.approx(quiz["fine-tuned"] - quiz["base"])
    markdown = (tmp_path / "eval_report.md").read_text(encoding="utf-8")
    assert "## Knowledge check (lm-eval)" in markdown and "| quiz_answer_only | 1.0000 | 1.0000 | +0.0000 |" in markdown


def test_an_unknown_knowledge_task_is_one_line(smoke_run, tasks_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_path", str(smoke_run), "--knowledge", "cmmlu_typo", "--knowledge_tasks_dir", str(tasks_dir)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --knowledge: lm-eval knows no task cmmlu_typo"
