"""Clean dialogues -> chat samples: `multi_turn` windows of turns or `per_turn` prompt/completion pairs."""

from datasets import Features

from sft.common.config import DataArguments
from sft.data.records import MESSAGES

SAMPLE_FEATURES = {
    "multi_turn": Features({"messages": MESSAGES}),
    "per_turn": Features({"prompt": MESSAGES, "completion": MESSAGES}),
}


def sample_format(args: DataArguments, form: str) -> str:
    """The sample format of a source: chat-form records (messages, alpaca, ShareGPT) stay whole conversations."""
    return args.sample_format if form == "dialogue" else "multi_turn"


def alternating_messages(utterances: list[str], system_prompt: str | None) -> list[dict]:
    """Chat messages of consecutive utterances: the first speaker is the user and the speakers alternate."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return head + [{"role": "assistant" if i % 2 else "user", "content": text} for i, text in enumerate(utterances)]


def multi_turn_samples(utterances: list[str], max_turns: int, system_prompt: str | None = None) -> list[dict]:
    """multi_turn: consecutive windows of at most `max_turns` turns, every reply a target exactly once.

    A turn is one user message and the reply to it; a last message without a reply is no turn and is left out.
    """
    end, step = len(utterances) - len(utterances) % 2, 2 * max_turns
    return [
        {"messages": alternating_messages(utterances[start : min(start + step, end)], system_prompt)}
        for start in range(0, end, step)
    ]


def per_turn_samples(utterances: list[str], max_turns: int, system_prompt: str | None = None) -> list[dict]:
    """per_turn: one sample per reply, with up to `max_turns - 1` earlier turns and the user message as prompt."""
    return [
        {
            "prompt": alternating_messages(utterances[max(0, reply - 2 * max_turns + 1) : reply], system_prompt),
            "completion": [{"role": "assistant", "content": utterances[reply]}],
        }
        for reply in range(1, len(utterances), 2)
    ]


SAMPLE_BUILDERS = {"multi_turn": multi_turn_samples, "per_turn": per_turn_samples}


def dialogue_samples(utterances: list[str], args: DataArguments) -> list[dict]:
    """The samples of one clean dialogue; with `both_speakers`, also those of the dialogue shifted by one utterance."""
    build = SAMPLE_BUILDERS[args.sample_format]
    views = [utterances, utterances[1:]] if args.both_speakers else [utterances]
    return [sample for view in views for sample in build(view, args.max_turns, args.system_prompt)]
