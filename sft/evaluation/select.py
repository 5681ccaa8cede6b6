"""Which checkpoint to keep: the one that learned most and forgot least.

lccc-sft select --model_path output/smoke [--max_knowledge_drop 1 --knowledge cmmlu] [--max_loss_increase 0.05]

Scores the base (the start), every saved `checkpoint-N` of a run and its final adapter on the held-out loss of each
data source, the Chinese chat diagnostics and, with `--knowledge`, lm-eval accuracy; keeps, among the checkpoints
within the forgetting budget, the one with the lowest loss on the target sources. Writes `selection/scores.json`
(the cache: a checkpoint scored with the same settings is not scored again), `selection/selection.json` (what
`--checkpoint selected` of merge, serve and export-gguf reads), `selection/selection.md` and `selection/selection.png`.
When no checkpoint meets the budget it names the tightest constraint and the mixture weight to raise.
"""

import argparse
import dataclasses
import filecmp
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sft.common.errors import UserError, exits_cleanly_on_user_error
from sft.common.files import write_atomically
from sft.common.generation import GenerationArguments
from sft.common.inference import (
    SELECTION,
    TrainedModelArguments,
    default_device,
    load_base,
    parse_generating_command,
    read_run,
    start_command_logging,
)
from sft.evaluation.batch_generation import generate_replies
from sft.evaluation.diagnostics import DIAGNOSTICS, diagnose, diagnostic_inputs
from sft.evaluation.held_out import held_out_conversations, reply_perplexity
from sft.evaluation.report import markdown_table

logger = logging.getLogger(__name__)

BASE = "base"
FINAL = "final"
# Diagnostics a budget caps from above (`max_<name>`), and the one it bounds from below.
CAPPED = {
    "generic_rate": "max_generic_rate",
    "latin_drift_rate": "max_latin_drift",
    "traditional_drift_rate": "max_traditional_drift",
    "echo_rate": "max_echo_rate",
    "self_repetition_rate": "max_self_repetition",
}


@dataclass
class SelectArguments:
    """What every checkpoint is scored on, and the forgetting budget the kept one must stay within."""

    split: str = field(default="validation", metadata={"help": "Held-out split to score on."})
    num_samples: int = field(default=32, metadata={"help": "Contexts to generate replies for (diagnostics)."})
    max_ppl_samples: int | None = field(default=200, metadata={"help": "At most this many conversations per source."})
    num_dialogues: int = field(default=8, metadata={"help": "Multi-turn dialogues answered turn by turn."})
    generic_top_k: int = field(default=20, metadata={"help": "The training data's most frequent replies: generic."})
    batch_size: int = field(default=8, metadata={"help": "Conversations per forward pass or generate call."})
    knowledge: list[str] | None = field(
        default=None, metadata={"help": "lm-eval tasks to score every checkpoint on.", "nargs": "+"}
    )
    knowledge_tasks_dir: str | None = field(default=None, metadata={"help": "A folder of local lm-eval task YAMLs."})
    knowledge_limit: int | None = field(default=None, metadata={"help": "At most this many questions per task."})
    max_knowledge_drop: float | None = field(
        default=None, metadata={"help": "Budget: each --knowledge task's accuracy at most this many points below base."}
    )
    max_loss_increase: float | None = field(
        default=None,
        metadata={"help": "Budget: each general source's loss at most this share above base (0.05: 5 percent)."},
    )
    general_sources: list[str] | None = field(
        default=None,
        metadata={
            "help": "The general-data sources (labels) whose loss must not rise (default: a mixture's sources after "
            "the first; one source: that source). The others are the target the best checkpoint learned most of.",
            "nargs": "+",
        },
    )
    max_generic_rate: float | None = field(default=None, metadata={"help": "Budget: generic replies at most."})
    max_latin_drift: float | None = field(default=None, metadata={"help": "Budget: Latin-script drift at most."})
    max_traditional_drift: float | None = field(default=None, metadata={"help": "Budget: traditional drift at most."})
    max_echo_rate: float | None = field(default=None, metadata={"help": "Budget: echoes of the user at most."})
    max_self_repetition: float | None = field(default=None, metadata={"help": "Budget: self-repetition at most."})
    min_system_prompt_compliance: float | None = field(
        default=None, metadata={"help": "Budget: system-prompt probes kept at least (runs with a system prompt)."}
    )


@dataclass
class Constraint:
    """One limit of the budget: its description, and how far a candidate's scores exceed it (> 0: outside)."""

    name: str
    excess: object  # (scores, base scores) -> float

    def fails(self, scores: dict, base: dict) -> bool:
        return self.excess(scores, base) > 0


def budget(args: SelectArguments, general: list[str], tasks: list[str]) -> list[Constraint]:
    """The user's forgetting budget as constraints."""
    constraints = []
    if args.max_knowledge_drop is not None:
        for task in tasks:
            constraints.append(
                Constraint(
                    f"knowledge `{task}` at most {args.max_knowledge_drop:g} points below base",
                    lambda s, b, t=task: 100 * (b["knowledge"][t] - s["knowledge"][t]) - args.max_knowledge_drop,
                )
            )
    if args.max_loss_increase is not None:
        for source in general:
            constraints.append(
                Constraint(
                    f"`{source}` loss at most {args.max_loss_increase:.0%} above base",
                    lambda s, b, x=source: s["loss"][x] / b["loss"][x] - 1 - args.max_loss_increase,
                )
            )
    for key, limit_name in CAPPED.items():
        limit = getattr(args, limit_name)
        if limit is not None:
            name = f"{DIAGNOSTICS[key]} at most {limit:g}"
            constraints.append(Constraint(name, lambda s, b, k=key, m=limit: s[k] - m))
    if args.min_system_prompt_compliance is not None:
        limit = args.min_system_prompt_compliance
        constraints.append(
            Constraint(
                f"{DIAGNOSTICS['system_prompt_compliance']} at least {limit:g}",
                lambda s, b, m=limit: m - s.get("system_prompt_compliance", m),
            )
        )
    return constraints


def tightest(constraints: list[Constraint], candidates: dict, base: dict) -> Constraint:
    """The constraint that rejects the most candidates; of those, the one its best candidate misses by most."""
    return max(
        constraints,
        key=lambda c: (
            sum(c.fails(s, base) for s in candidates.values()),
            min(c.excess(s, base) for s in candidates.values()),
        ),
    )


def advice(constraint: Constraint, sources: list[str], general: list[str]) -> str:
    """Which mixture weight to raise when even the best checkpoint breaks `constraint`."""
    if len(sources) == 1:
        return "the run has one source: mix general data into it (`datasets:` with a `weight` each, docs/data.md)"
    named = [source for source in general if f"`{source}` loss" in constraint.name]
    if named:
        return f"raise the `weight` of `{named[0]}` in the recipe's `datasets:`"
    return f"raise the `weight` of the general sources ({', '.join(general)}) in the recipe's `datasets:`"


# --- Candidates and their scores. --------------------------------------------------------------------------------


def candidates(run_path: Path) -> dict[str, Path]:
    """Every saved checkpoint of the run by step, and the final adapter unless the last checkpoint is the same."""
    steps = {
        int(m.group(1)): path
        for path in run_path.iterdir()
        if (m := re.fullmatch(r"checkpoint-(\d+)", path.name)) and (path / "adapter_config.json").is_file()
    }
    found = {steps[step].name: steps[step] for step in sorted(steps)}
    final = run_path / "adapter_model.safetensors"
    last = next(reversed(found.values()), None)
    if final.is_file() and not (last and filecmp.cmp(final, last / final.name, shallow=False)):
        found[FINAL] = run_path
    if not found:
        raise UserError(f"{run_path} holds no adapter checkpoints to choose from (a LoRA training run's folder)")
    return found


def step_of(name: str, path: Path) -> int | None:
    if name.startswith("checkpoint-"):
        return int(name.removeprefix("checkpoint-"))
    state = path / "trainer_state.json"
    return json.loads(state.read_text(encoding="utf-8")).get("global_step") if state.is_file() else None


def fingerprint(path: Path) -> list:
    """What identifies an adapter's weights on disk: size and modification time."""
    stat = (path / "adapter_model.safetensors").stat()
    return [stat.st_size, stat.st_mtime_ns]


def held_out_by_label(run, args: SelectArguments) -> tuple[dict, list[list[dict]], bool]:
    """The held-out conversations per source label (one label for data of one source), all of them, last-reply flag."""
    from sft.data.mixture import source_label

    held_out = argparse.Namespace(split=args.split, dataset_name=None)
    conversations, last_reply_only, name, by_source = held_out_conversations(run, held_out)
    return by_source or {source_label(name): conversations}, conversations, last_reply_only


def score(model, tokenizer, run, data: dict, args, generation: GenerationArguments, manager) -> dict:
    """A loaded model's held-out loss per source, diagnostics and knowledge accuracy."""
    losses = {
        label: reply_perplexity(
            model, tokenizer, conversations[: args.max_ppl_samples], run.max_length, args.batch_size, data["last"]
        )["reply_loss"]
        for label, conversations in data["by_source"].items()
    }

    def generate(contexts):
        return [r.text for r in generate_replies(model, tokenizer, contexts, generation, args.batch_size, True).replies]

    contexts = data["contexts"]
    diagnostics, _ = diagnose(generate, contexts, generate(contexts), data["inputs"])
    diagnostics.pop("generic_top", None)
    scores = {"loss": losses, **diagnostics}
    if args.knowledge:
        from sft.evaluation.knowledge import accuracy

        scores["knowledge"] = accuracy(model, tokenizer, args.knowledge, manager, args.knowledge_limit, args.batch_size)
    return scores


def score_all(where: TrainedModelArguments, args: SelectArguments, generation: GenerationArguments, out: Path):
    """Scores of the base and every candidate, from the cache where the settings and weights are unchanged."""
    run = read_run(where.model_path, where.base_model)
    found = candidates(run.model_path)
    generation = dataclasses.replace(generation, seed=run.seed if generation.seed is None else generation.seed)
    settings = json.loads(
        json.dumps(
            {
                "select": {k: v for k, v in dataclasses.asdict(args).items() if not k.startswith(("max_", "min_"))}
                | {"general_sources": None},
                "generation": dataclasses.asdict(generation),
                "quantize": where.quantize,
            }
        )
    )
    cache_file = out / "scores.json"
    cache = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.is_file() else {}
    if cache.get("settings") != settings:
        if cache:
            logger.info("the scoring settings changed since %s: every checkpoint is scored again", cache_file)
        cache = {"settings": settings, "scores": {}}
    keys = {BASE: [run.base_model]} | {name: fingerprint(path) for name, path in found.items()}
    todo = [name for name, key in keys.items() if cache["scores"].get(name, {}).get("key") != key]
    if todo:
        logger.info("scoring %s (cached: %d)", ", ".join(todo), len(keys) - len(todo))
        by_source, conversations, last = held_out_by_label(run, args)
        data = {
            "by_source": by_source,
            "last": last,
            "contexts": [messages[:-1] for messages in conversations[: args.num_samples]],
            "inputs": diagnostic_inputs(run, conversations, args.num_dialogues, args.generic_top_k, limit=0),
        }
        manager = None
        if args.knowledge:
            from sft.evaluation.knowledge import task_manager

            manager = task_manager(args.knowledge, args.knowledge_tasks_dir)
        tokenizer = run.load_tokenizer(reply_mask=True)
        model = load_base(run, run.loads_quantized(where.quantize), where.device or default_device()).eval()
        for name in todo:
            if name != BASE:
                model = with_adapter(model, found[name], name)
            logger.info("scoring %s", name)
            if name == BASE and hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    scores = score(model, tokenizer, run, data, args, generation, manager)
            else:
                scores = score(model, tokenizer, run, data, args, generation, manager)
            cache["scores"][name] = {"key": keys[name], "step": 0 if name == BASE else step_of(name, found[name])}
            cache["scores"][name] |= {"scores": scores}
            write_atomically(cache_file, json.dumps(cache, ensure_ascii=False, indent=2))
    scored = {name: cache["scores"][name] for name in keys}
    return run, scored, todo


def with_adapter(model, path: Path, name: str):
    """`model` with the adapter at `path` as its only active one (the base is loaded once for all checkpoints)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return PeftModel.from_pretrained(model, path, adapter_name=name).eval()
    previous = model.active_adapter
    model.load_adapter(path, adapter_name=name)
    model.set_adapter(name)
    model.delete_adapter(previous)
    return model.eval()


# --- The choice and the report. -----------------------------------------------------------------------------------


def choose(scored: dict, args: SelectArguments) -> dict:
    """The kept checkpoint (lowest target loss within the budget), each candidate's verdict, and why."""
    base = scored[BASE]["scores"]
    sources = list(base["loss"])
    general = args.general_sources or (sources[1:] if len(sources) > 1 else sources)
    unknown = sorted(set(general) - set(sources))
    if unknown:
        raise UserError(f"--general_sources {', '.join(unknown)}: the run's sources are {', '.join(sources)}")
    target = [source for source in sources if source not in general] or sources
    constraints = budget(args, general, args.knowledge or [])
    pool = {name: entry["scores"] for name, entry in scored.items() if name != BASE}
    broken = {name: [c.name for c in constraints if c.fails(s, base)] for name, s in pool.items()}
    objective = {name: sum(s["loss"][x] for x in target) / len(target) for name, s in pool.items()}
    allowed = [name for name in pool if not broken[name]]
    selected = min(allowed, key=objective.get) if allowed else None
    if selected:
        reason = (
            f"`{selected}` has the lowest held-out loss on {', '.join(target)} ({objective[selected]:.4f}) of the "
            f"{len(allowed)} of {len(pool)} checkpoints within the budget"
        )
    elif constraints:
        worst = tightest(constraints, pool, base)
        rejected = sum(worst.fails(s, base) for s in pool.values())
        reason = (
            f"no checkpoint meets the budget; the tightest constraint is {worst.name} (it rejects {rejected} of "
            f"{len(pool)}): {advice(worst, sources, general)}"
        )
    else:
        reason = "no checkpoint to choose from"
    return {
        "selected": selected,
        "reason": reason,
        "budget": [c.name for c in constraints],
        "target_sources": target,
        "general_sources": general,
        "checkpoints": {name: {"objective": objective[name], "outside_budget": broken[name]} for name in pool},
    }


def selection_table(scored: dict, choice: dict) -> str:
    sources = list(scored[BASE]["scores"]["loss"])
    diagnostics = [key for key in DIAGNOSTICS if key in scored[BASE]["scores"]]
    tasks = list(scored[BASE]["scores"].get("knowledge", {}))
    header = ["checkpoint", "step", *(f"loss {s}" for s in sources), *diagnostics, *(f"acc {t}" for t in tasks)]
    header.append("verdict")
    rows = []
    for name, entry in scored.items():
        s = entry["scores"]
        verdict = "start" if name == BASE else "kept" if name == choice["selected"] else ""
        if name in choice["checkpoints"] and choice["checkpoints"][name]["outside_budget"]:
            verdict = "outside: " + "; ".join(choice["checkpoints"][name]["outside_budget"])
        cells = [name, str(entry["step"]), *(f"{s['loss'][x]:.4f}" for x in sources)]
        cells += [f"{s[k]:.4f}" for k in diagnostics] + [f"{s['knowledge'][t]:.4f}" for t in tasks]
        rows.append([*cells, verdict or "within budget"])
    return markdown_table(header, rows)


def plot_selection(scored: dict, choice: dict, output: Path) -> Path:
    """Loss per source and the diagnostics against the step, the kept checkpoint marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = sorted((e["step"] or 0, name, e["scores"]) for name, e in scored.items())
    steps = [step for step, _, _ in entries]
    fig, (losses, rates) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for source in scored[BASE]["scores"]["loss"]:
        losses.plot(steps, [s["loss"][source] for _, _, s in entries], marker="o", label=f"loss {source}")
    for key in DIAGNOSTICS:
        if key in scored[BASE]["scores"]:
            rates.plot(steps, [s[key] for _, _, s in entries], marker=".", label=key)
    for task in scored[BASE]["scores"].get("knowledge", {}):
        rates.plot(steps, [s["knowledge"][task] for _, _, s in entries], marker="s", label=f"accuracy {task}")
    if choice["selected"]:
        for ax in (losses, rates):
            ax.axvline(scored[choice["selected"]]["step"] or 0, color="grey", linestyle="--", label="kept")
    for ax, title in ((losses, "held-out loss"), (rates, "diagnostics and knowledge")):
        ax.set_xlabel("step (base = 0)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> dict:
    where, args, generation = parse_generating_command(
        SelectArguments, sys.argv[1:] if argv is None else argv, prog="lccc-sft select"
    )
    if where.checkpoint:
        raise UserError("lccc-sft select scores every checkpoint of a run: give the run folder without --checkpoint")
    start_command_logging()
    out = Path(where.model_path) / SELECTION.parent
    out.mkdir(parents=True, exist_ok=True)
    run, scored, scored_now = score_all(where, args, generation, out)
    choice = choose(scored, args) | {"scored_now": scored_now}
    table = selection_table(scored, choice)
    plot = plot_selection(scored, choice, out / "selection.png")
    write_atomically(run.model_path / SELECTION, json.dumps(choice, ensure_ascii=False, indent=2))
    markdown = [f"# Checkpoint selection for `{run.model_path}`", "", choice["reason"] + ".", ""]
    markdown += [f"Budget: {'; '.join(choice['budget']) or 'none'}.", "", table, "", f"![scores]({plot.name})", ""]
    write_atomically(out / "selection.md", "\n".join(markdown))
    print(table)
    if choice["selected"] is None:
        raise UserError(choice["reason"])
    print(f"kept {choice['selected']}: {choice['reason']}; use it with --checkpoint selected")
    return choice


if __name__ == "__main__":
    main()
