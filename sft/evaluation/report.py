"""The evaluation report: metric tables, the worst replies (loops, no stop), the Chinese chat diagnostics with their
worst examples, examples and loss curves."""

import json
import logging
from pathlib import Path

from sft.evaluation.diagnostics import DIAGNOSTICS, ECHO_THRESHOLD, PROBE_MAX_CHARS, REPEAT_THRESHOLD

logger = logging.getLogger(__name__)

DECODINGS = ("sampling", "greedy")
METRIC_NAMES = {
    "bleu_2": "BLEU-2",
    "bleu_4": "BLEU-4",
    "distinct_1": "Distinct-1",
    "distinct_2": "Distinct-2",
    "avg_len": "avg reply length (chars)",
    "no_stop_rate": "never stopped (share)",
    "loop_rate": "loops (share)",
    "generic_rate": "generic replies (share)",
    "repeated_ngram_rate": "repeated 4-gram rate (mean)",
    "replies_per_s": "replies/s",
    "tokens_per_s": "generated tokens/s",
}
DIGITS = {"perplexity": 2, "bleu_2": 2, "bleu_4": 2, "avg_len": 1, "replies_per_s": 2, "tokens_per_s": 1}
DEFINITIONS = (
    "BLEU is sacrebleu's corpus BLEU at character level (0-100); Distinct-n is distinct/all character n-grams over "
    "all replies. A reply *never stopped* when it ran into max_new_tokens without the end-of-turn token; it *loops* "
    "when one character 4-gram occurs 3 or more times in it (whitespace left out, overlaps counted); its repeated "
    "4-gram rate is 1 - distinct/all of its character 4-grams; it is *generic* when it is one of the most frequent "
    "replies of the training data. The headline metrics in `eval_report.json` are "
    "those of the sampled replies, as in the LCCC paper."
)
DIAGNOSTIC_DEFINITIONS = (
    "The diagnostics score the sampled replies. A reply is *generic* when it is one of the training data's most "
    "frequent replies (listed below); *Latin-script drift* is the share of Latin characters in the replies whose "
    "context has none, *traditional-character drift* the share of characters OpenCC's traditional-to-simplified "
    "table changes, in the replies whose context has none; a reply *echoes* when more than "
    f"{ECHO_THRESHOLD:.0%} of its characters copy the last user turn; in multi-turn test dialogues answered turn by "
    "turn, a reply *repeats itself* when its similarity to an earlier reply of the same dialogue is at least "
    f"{REPEAT_THRESHOLD}; a *system-prompt probe is kept* when the reply is simplified Chinese (no Latin letter, no "
    f"traditional-only character) of at most {PROBE_MAX_CHARS} characters."
)


def format_value(key: str, value: float) -> str:
    return f"{value:.{DIGITS.get(key, 4)}f}"


def metric_rows(report: dict) -> list[list[str]]:
    """One row per metric and decoding: name, fine-tuned value, then the base's and other runs' when compared."""
    rows = [("perplexity (replies)", "perplexity", None)]
    rows += [(f"{name}, {DECODINGS[0]}", key, None) for key, name in DIAGNOSTICS.items()]
    for decoding in DECODINGS:
        rows += [(f"{name}, {decoding}", key, decoding) for key, name in METRIC_NAMES.items()]
    blocks = [report, *([report["base"]] if report.get("base") else []), *(report.get("runs") or {}).values()]
    return [
        [name, *(format_value(key, (block if decoding is None else block[decoding])[key]) for block in blocks)]
        for name, key, decoding in rows
        if key in (report if decoding is None else report[decoding])
    ]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] + ["---:"] * (len(header) - 1), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def metrics_table(report: dict) -> str:
    others = ["base"] * bool(report.get("base")) + list(report.get("runs") or {})
    header = ["metric", "fine-tuned", *others] if others else ["metric", "value"]
    return markdown_table(header, metric_rows(report))


def knowledge_table(knowledge: dict) -> str:
    rows = [
        [task, f"{scores['fine-tuned']:.4f}", f"{scores['base']:.4f}", f"{scores['difference']:+.4f}"]
        for task, scores in knowledge["accuracy"].items()
    ]
    return markdown_table(["task (accuracy)", "fine-tuned", "base", "difference"], rows)


def show_context(messages: list[dict]) -> str:
    return " / ".join(f"{m['role']}: {m['content']}" for m in messages if m["role"] != "system") or "(empty)"


def worst_section(worst: list[dict]) -> list[str]:
    """The replies that loop or never stopped, most repetitive first."""
    lines = ["## Worst replies: loops and replies that never stopped", ""]
    if not worst:
        return lines + ["No reply looped or ran into max_new_tokens.", ""]
    for entry in worst:
        flags = [name for name, on in (("loops", entry["loops"]), ("never stopped", not entry["stopped"])) if on]
        lines += [
            f"- **{entry['model']}, {entry['decoding']}** ({', '.join(flags)}; repeated 4-gram rate "
            f"{entry['repeated_ngram_rate']:.2f}, {entry['tokens']} tokens) after "
            f"*{show_context(entry['context'])}*: {entry['reply'] or '(empty)'}"
        ]
    return lines + [""]


def diagnostics_section(report: dict, num_examples: int) -> list[str]:
    """The diagnostics' definitions, the generic replies of the training data, and each figure's worst examples."""
    diagnostics = report["diagnostics"]
    lines = ["## Chinese chat diagnostics", "", DIAGNOSTIC_DEFINITIONS, ""]
    generic = diagnostics["generic_replies"]
    if generic is not None:
        shown = ", ".join(f"{reply} ({count})" for reply, count in generic[:num_examples]) or "none repeats"
        lines += [f"The training data's most frequent replies (of {len(generic)} in the JSON report): {shown}.", ""]
        for label, block in (("fine-tuned", report), ("base", report.get("base"))):
            if block and block.get("generic_top"):
                top = ", ".join(f"{reply} ({count})" for reply, count in block["generic_top"])
                lines += [f"Generic replies of the {label} model: {top}.", ""]
    for key, name in DIAGNOSTICS.items():
        entries = [(label, entry) for label, ex in diagnostics["examples"].items() for entry in ex.get(key, [])]
        if key not in report or not entries or not num_examples:
            continue
        lines += [f"### Worst: {name}", ""]
        for label, entry in entries[:num_examples]:
            reply = entry["reply"] or "(empty)"
            lines.append(f"- **{label}** ({entry['value']:.2f}) after *{show_context(entry['context'])}*: {reply}")
        lines.append("")
    return lines


def markdown_report(report: dict, num_examples: int) -> str:
    settings = report["settings"]
    lines = [
        f"# Evaluation of `{report['model_path']}`",
        "",
        f"Base model `{report['base_model']}` (quantization: {settings['quantization']}), held-out "
        f"`{settings['split']}` split of `{settings['dataset_name']}`: perplexity over the "
        f"{'last reply' if settings['last_reply_only'] else 'replies'} of {settings['ppl_conversations']} "
        f"conversations ({report['reply_tokens']} reply tokens), reply metrics on {settings['num_samples']} "
        f"contexts, at most {settings['max_new_tokens']} new tokens, greedy and sampled (top_p {settings['top_p']}, "
        f"temperature {settings['temperature']}, top_k {settings['top_k']}, seed {settings['seed']}), "
        f"repetition_penalty {settings['repetition_penalty']}, no_repeat_ngram_size "
        f"{settings['no_repeat_ngram_size']}, batches of {settings['batch_size']} prompts of similar length.",
        "",
        DEFINITIONS,
        "",
        metrics_table(report),
        "",
    ]
    if report.get("knowledge"):
        lines += ["## Knowledge check (lm-eval)", "", knowledge_table(report["knowledge"]), ""]
    if report.get("loss_curves"):
        lines += [f"![training and eval loss]({Path(report['loss_curves']).name})", ""]
    lines += worst_section(report["worst"][:num_examples]) if num_examples else []
    lines += diagnostics_section(report, num_examples) if "diagnostics" in report else []
    if report["samples"] and num_examples:
        lines += ["## Examples", ""]
    compared = "base" in report
    for i, sample in enumerate(report["samples"][:num_examples], 1):
        lines += [f"### {i}. {show_context(sample['context'])}", "", f"- reference: {sample['reference']}"]
        replies = [("fine-tuned, greedy", "greedy"), ("fine-tuned, sampled", "sampled")]
        if compared:
            replies += [("base, greedy", "base_greedy"), ("base, sampled", "base_sampled")]
        lines += [f"- {name}: {sample[key] or '(empty)'}" for name, key in replies]
        lines += [f"- {path}, greedy: {reply or '(empty)'}" for path, reply in sample.get("runs", {}).items()]
        lines.append("")
    return "\n".join(lines)


def plot_loss_curves(trainer_state: Path, output: Path) -> Path | None:
    """Training and eval loss per step from `trainer_state.json`'s log history, as a PNG."""
    if not trainer_state.is_file():
        logger.info("no %s: no loss curves drawn", trainer_state.name)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads(trainer_state.read_text(encoding="utf-8")).get("log_history", [])
    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        logger.info("%s logs no loss: no loss curves drawn", trainer_state)
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"Loss curves: {trainer_state.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output
