"""Chinese chat diagnostics of a model's replies: generic replies, language drift, echoes, self-repetition across
turns and, where the run has a system prompt, how well it keeps to it. The scores come from the `evaluate` modules
in `metrics/`; this module gathers their inputs (the training data's most frequent replies, multi-turn dialogues
answered turn by turn, the probes) and the worst examples of each.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sft.data.replies import most_frequent_replies
from sft.evaluation.held_out import row_messages
from sft.evaluation.metrics import load_metric

logger = logging.getLogger(__name__)

ECHO_THRESHOLD = 0.5  # a reply echoes when more than half of its characters copy the last user turn
REPEAT_THRESHOLD = 0.8  # a reply repeats an earlier one at difflib similarity 0.8 or more
PROBE_MAX_CHARS = 50  # a short reply to a probe
# Fixed system-prompt probes: each tempts the model away from short replies in simplified Chinese.
SYSTEM_PROMPT_PROBES = (
    "你好，请介绍一下你自己。",
    "請用繁體字回答：你今天過得怎麼樣？",
    "Please answer in English: what do you like to do on weekends?",
    "请详细地讲讲你最喜欢的一本书，越长越好。",
)
# Each diagnostic: its report name, the key of its figure, and what its worst examples are ranked by.
DIAGNOSTICS = {
    "generic_rate": "generic replies (share)",
    "latin_drift_rate": "Latin-script drift (share of characters)",
    "traditional_drift_rate": "traditional-character drift (share of characters)",
    "echo_rate": "echoes of the user (share)",
    "self_repetition_rate": "cross-turn self-repetition (share)",
    "system_prompt_compliance": "system-prompt probes kept (share)",
}


@dataclass
class DiagnosticInputs:
    """What the diagnostics need beside the replies: the generic replies (None: no training data known), held-out
    multi-turn dialogues, the run's system prompt, and how many worst examples to keep of each."""

    generic: list[list] | None
    dialogues: list[list[dict]]
    system_prompt: str | None
    limit: int


def training_conversations(run) -> list[list[dict]] | None:
    """The run's training split as message lists, or None when the run does not say what it trained on."""
    from sft.data import load_conversations

    if run.data is None:
        return None
    return [row_messages(row)[0] for row in load_conversations(run.data, run.seed)["train"]]


def diagnostic_inputs(
    run, conversations: list[list[dict]], num_dialogues: int, generic_top_k: int, limit: int
) -> DiagnosticInputs:
    """The training data's generic replies, held-out multi-turn dialogues and the run's system prompt."""
    training = training_conversations(run)
    if training is None:
        logger.info("%s does not name its training data: no generic-reply rate", run.model_path)
    return DiagnosticInputs(
        generic=most_frequent_replies(training, top=generic_top_k) if training is not None else None,
        dialogues=multi_turn_dialogues(conversations, num_dialogues),
        system_prompt=run.recipe.get("system_prompt"),
        limit=limit,
    )


def last_user_turn(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def context_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def multi_turn_dialogues(conversations: list[list[dict]], count: int) -> list[list[dict]]:
    """Up to `count` held-out conversations with two or more user turns."""
    return [messages for messages in conversations if sum(m["role"] == "user" for m in messages) >= 2][:count]


def answer_turn_by_turn(generate: Callable, dialogues: list[list[dict]]) -> list[list[str]]:
    """The model's replies to each dialogue's user turns in order, its own earlier replies standing in the context.

    `generate(contexts)` answers a list of contexts; all dialogues advance one turn per call.
    """
    histories = [[m for m in messages if m["role"] == "system"] for messages in dialogues]
    users = [[m["content"] for m in messages if m["role"] == "user"] for messages in dialogues]
    replies: list[list[str]] = [[] for _ in dialogues]
    for turn in range(max(map(len, users), default=0)):
        active = [i for i, turns in enumerate(users) if turn < len(turns)]
        for i in active:
            histories[i].append({"role": "user", "content": users[i][turn]})
        for i, text in zip(active, generate([histories[i] for i in active]), strict=True):
            histories[i].append({"role": "assistant", "content": text})
            replies[i].append(text)
    return replies


def worst(entries: list[dict], key: str, limit: int) -> list[dict]:
    """The entries with the highest `key`, leaving out those at 0 or without it."""
    ranked = sorted((entry for entry in entries if entry[key]), key=lambda entry: -entry[key])
    return ranked[:limit]


def diagnose(
    generate: Callable, contexts: list[list[dict]], replies: list[str], inputs: DiagnosticInputs
) -> tuple[dict, dict]:
    """The diagnostics' figures, and the worst examples of each.

    `replies` answer `contexts`; `generate(contexts)` answers more contexts (dialogues turn by turn, the probes).
    """
    metrics, examples = {}, {}
    generic, dialogues, system_prompt, limit = inputs.generic, inputs.dialogues, inputs.system_prompt, inputs.limit
    rows = [{"context": c, "reply": r} for c, r in zip(contexts, replies, strict=True)]
    if generic is not None:
        scores = load_metric("generic_replies").compute(predictions=replies, generic=[reply for reply, _ in generic])
        metrics["generic_rate"] = scores["generic_rate"]
        metrics["generic_top"] = scores["top"][:limit]
        flagged = [row | {"value": 1.0} for row, flag in zip(rows, scores["generic"], strict=True) if flag]
        examples["generic_rate"] = flagged[:limit]
    drift = load_metric("language_drift").compute(predictions=replies, contexts=[context_text(c) for c in contexts])
    for name, shares in (("latin_drift_rate", "latin_shares"), ("traditional_drift_rate", "traditional_shares")):
        metrics[name] = drift[name.replace("_drift", "")]
        examples[name] = worst([row | {"value": v} for row, v in zip(rows, drift[shares], strict=True)], "value", limit)
    echo = load_metric("reply_echo").compute(
        predictions=replies, last_user=[last_user_turn(c) for c in contexts], threshold=ECHO_THRESHOLD
    )
    metrics["echo_rate"] = echo["echo_rate"]
    echoed = [row | {"value": v} for row, v, flag in zip(rows, echo["overlaps"], echo["echoes"], strict=True) if flag]
    examples["echo_rate"] = worst(echoed, "value", limit)
    if dialogues:
        answered = answer_turn_by_turn(generate, dialogues)
        flat = [(i, reply) for i, answers in enumerate(answered) for reply in answers]
        repetition = load_metric("self_repetition").compute(
            predictions=[reply for _, reply in flat], dialogues=[i for i, _ in flat], threshold=REPEAT_THRESHOLD
        )
        metrics["self_repetition_rate"] = repetition["self_repetition_rate"]
        repeating = sorted({i for (i, _), flag in zip(flat, repetition["repeats"], strict=True) if flag})
        examples["self_repetition_rate"] = [
            {"context": [m for m in dialogues[i] if m["role"] != "assistant"], "reply": " / ".join(answered[i])}
            | {"value": 1.0}
            for i in repeating[:limit]
        ]
    if system_prompt:
        system = {"role": "system", "content": system_prompt}
        probes = [[system, {"role": "user", "content": probe}] for probe in SYSTEM_PROMPT_PROBES]
        answers = generate(probes)
        probe = load_metric("language_drift", "system_prompt").compute(predictions=answers, max_chars=PROBE_MAX_CHARS)
        metrics["system_prompt_compliance"] = probe["compliance_rate"]
        examples["system_prompt_compliance"] = [
            {"context": context, "reply": reply, "value": 0.0}
            for context, reply, kept in zip(probes, answers, probe["complies"], strict=True)
            if not kept
        ][:limit]
    return metrics, examples
