"""What did fine-tuning forget? Multiple-choice accuracy of the base and the fine-tuned model through lm-eval.

Real tasks (`cmmlu`, `ceval-valid`, any lm-eval task or group) fetch their data from the Hub on first use;
`--knowledge_tasks_dir` points lm-eval at a folder of local task YAMLs instead (the tests use one).
"""

import logging

from sft.common.errors import UserError

logger = logging.getLogger(__name__)


def task_manager(tasks: list[str], tasks_dir: str | None):
    """lm-eval's task index (its built-in tasks, or only the task YAMLs in `tasks_dir`), knowing all `tasks`."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError('--knowledge needs lm-eval: pip install -e ".[knowledge]"') from None
    manager = TaskManager(include_path=tasks_dir, include_defaults=False) if tasks_dir else TaskManager()
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        raise UserError(f"--knowledge: lm-eval knows no task {', '.join(unknown)}")
    return manager


def accuracy(model, tokenizer, tasks: list[str], manager, limit: int | None, batch_size: int) -> dict:
    """Accuracy per task (or group) of an already loaded model, as lm-eval scores it."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    scores = {**results.get("groups", {}), **results["results"]}
    return {task: scores[task]["acc,none"] for task in tasks}


def compare(tuned: dict, base: dict) -> dict:
    """Accuracy of both models per task, and fine-tuned minus base."""
    return {
        task: {"fine-tuned": tuned[task], "base": base[task], "difference": tuned[task] - base[task]} for task in tuned
    }
