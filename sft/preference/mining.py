"""Preference pairs mined from the corpus and the SFT model's own failures (`lccc-sft pairs`).

For held-in training contexts, chosen is the human reply; rejected is the SFT model's own reply when `make eval`'s
measures flag it (it never stopped, it loops, or it is generic: one of the training data's most frequent replies),
else a fluent human reply from an unrelated dialogue. Each pair records why it was made (`reason`);
`pairs_stats.json` counts pairs per reason and the contexts dropped, by why.
"""

import dataclasses
import json
import logging
import random
import sys
from collections import Counter
from pathlib import Path

from sft.common.arguments import parse_arguments
from sft.common.config import RunArguments
from sft.common.errors import exits_cleanly_on_user_error
from sft.common.files import write_atomically
from sft.common.generation import load_generation_defaults
from sft.common.inference import load_model, start_command_logging
from sft.data import load_conversations
from sft.data.replies import most_frequent_replies, reply_key
from sft.evaluation.batch_generation import Reply, generate_replies
from sft.evaluation.metrics import load_metric
from sft.preference.config import PreferenceArguments, PreferenceRecipe, read_sft_run, training_config_class

logger = logging.getLogger(__name__)
PAIRS_FILE = "pairs.jsonl"
STATS_FILE = "pairs_stats.json"
REASONS = ("never_stopped", "loop", "generic", "unrelated")  # in the order a reply is judged
DROPS = ("chosen_generic", "rejected_equals_chosen", "no_unrelated_reply")


def loop_flags(texts: list[str]) -> list[bool]:
    """`make eval`'s loop measure, per reply."""
    return load_metric("reply_loops").compute(predictions=texts)["loops"] if texts else []


def rejected_reason(reply: Reply, loops: bool, generic: set[str]) -> str | None:
    """Why the SFT model's own reply is a rejected reply, or None when eval's measures do not flag it."""
    if not reply.stopped:
        return "never_stopped"
    if loops:
        return "loop"
    if reply_key(reply.text) in generic:
        return "generic"
    return None


def unrelated_reply(index: int, human: list[str], fluent: list[bool], rng: random.Random) -> str | None:
    """A fluent human reply (not empty, looping or generic) from another dialogue, different from this one's."""
    others = [i for i in range(len(human)) if i != index]
    rng.shuffle(others)
    return next((human[i] for i in others if fluent[i] and human[i].strip() != human[index].strip()), None)


def make_pairs(
    contexts: list[list[dict]], human: list[str], model_replies: list[Reply], generic: set[str], seed: int
) -> tuple[list[dict], Counter]:
    """One pair per context (prompt, chosen, rejected, reason) in TRL's conversational form, and the drops."""
    rng, pairs, dropped = random.Random(seed), [], Counter({drop: 0 for drop in DROPS})
    model_loops = loop_flags([reply.text for reply in model_replies])
    fluent = [
        text.strip() != "" and reply_key(text) not in generic and not loop
        for text, loop in zip(human, loop_flags(human), strict=True)
    ]
    for i, (context, chosen, reply) in enumerate(zip(contexts, human, model_replies, strict=True)):
        if reply_key(chosen) in generic:  # preferring one generic reply to another teaches nothing against dullness
            dropped["chosen_generic"] += 1
            continue
        reason = rejected_reason(reply, model_loops[i], generic)
        rejected = reply.text if reason else unrelated_reply(i, human, fluent, rng)
        if rejected is None:
            dropped["no_unrelated_reply"] += 1
            continue
        if rejected.strip() == chosen.strip():
            dropped["rejected_equals_chosen"] += 1
            continue
        pairs.append(
            {
                "prompt": context,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "reason": reason or "unrelated",
            }
        )
    return pairs, dropped


def held_in_turns(train, count: int, seed: int) -> tuple[list[list[dict]], list[str]]:
    """Up to `count` training samples as (context up to the last reply, that human reply), in a seeded order."""
    rows = list(range(len(train)))
    random.Random(seed).shuffle(rows)
    contexts, replies = [], []
    for row in rows[:count]:
        messages = train[row]["messages"]
        contexts.append(messages[:-1])
        replies.append(messages[-1]["content"])
    return contexts, replies


def mining_settings(preference: PreferenceArguments, seed: int) -> dict:
    """What the mined pairs depend on: pairs made with the same settings are reused."""
    keys = ("sft_run", "mine_contexts", "mine_max_new_tokens", "mine_sample", "generic_replies")
    return {**{key: getattr(preference, key) for key in keys}, "seed": seed}


def reusable_pairs(folder: Path, settings: dict) -> Path | None:
    stats = folder / STATS_FILE
    if (folder / PAIRS_FILE).is_file() and stats.is_file():
        if json.loads(stats.read_text(encoding="utf-8")).get("settings") == settings:
            return folder / PAIRS_FILE
    return None


def mine_pairs(preference: PreferenceArguments, seed: int, device: str | None = None) -> Path:
    """Mine pairs for the SFT run into `preference.mined_dir` (reused while the settings stay), return the file."""
    folder, settings = preference.mined_dir, mining_settings(preference, seed)
    if found := reusable_pairs(folder, settings):
        logger.info("reusing the pairs mined with these settings: %s", found)
        return found
    run = read_sft_run(preference.sft_run)
    train = load_conversations(run.data, run.seed)["train"]
    generic = [reply for reply, _ in most_frequent_replies(train["messages"], top=preference.generic_replies)]
    contexts, human = held_in_turns(train, preference.mine_contexts, seed)
    model, tokenizer = load_model(run, device=device), run.load_tokenizer()
    overrides = {"max_new_tokens": preference.mine_max_new_tokens} if preference.mine_max_new_tokens else {}
    generation = dataclasses.replace(load_generation_defaults(run.model_path, overrides), seed=seed)
    logger.info("mining: the SFT model answers %d held-in contexts", len(contexts))
    generated = generate_replies(
        model, tokenizer, contexts, generation, preference.mine_batch_size, preference.mine_sample, progress=True
    )
    pairs, dropped = make_pairs(contexts, human, generated.replies, set(generic), seed)
    stats = {
        "settings": settings,
        "contexts": len(contexts),
        "pairs": len(pairs),
        "pairs_by_reason": {reason: sum(p["reason"] == reason for p in pairs) for reason in REASONS},
        "dropped": dict(dropped),
        "generic_replies": generic,
        "generation": generated.speed,
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / PAIRS_FILE, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    write_atomically(folder / STATS_FILE, json.dumps(stats, ensure_ascii=False, indent=2))
    logger.info("mined %d pairs %s into %s", len(pairs), stats["pairs_by_reason"], folder)
    return folder / PAIRS_FILE


def pairs_for(recipe: PreferenceRecipe) -> Path:
    """The recipe's pair file, or pairs mined from its SFT run when it names none."""
    preference = recipe.preference
    return Path(preference.pairs_file) if preference.pairs_file else mine_pairs(preference, recipe.training.seed)


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> Path:
    """`lccc-sft pairs --config recipes/lccc_dpo.yaml`: mine the pairs alone (a DPO recipe's other keys are read)."""
    start_command_logging()
    argv = sys.argv[1:] if argv is None else argv
    config = training_config_class(argv)
    preference, training, _ = parse_arguments((PreferenceArguments, config, RunArguments), argv).values
    read_sft_run(preference.sft_run)
    return mine_pairs(preference, training.seed)
