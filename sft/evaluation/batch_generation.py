"""Replies for many contexts at once, for evaluation: prompts batched by length, each reply cut at its own end.

Prompts are sorted by token length (longest first, so a batch too large for memory fails at once) and batched with
left padding, so a batch pads little; every reply ends at its own end-of-turn token, and each reply records
whether it reached that token or ran into `max_new_tokens`. Replies come back in the order of the contexts.
"""

import time
from dataclasses import dataclass

import torch

from sft.common.generation import GenerationArguments, generation_kwargs
from sft.common.inference import encode_prompt, render_prompt


@dataclass
class Reply:
    text: str
    tokens: int  # generated tokens, the end-of-turn token included
    stopped: bool  # reached the end-of-turn token before max_new_tokens


@dataclass
class Generated:
    replies: list[Reply]
    seconds: float

    @property
    def speed(self) -> dict:
        """Replies and generated tokens per second of generation."""
        seconds = max(self.seconds, 1e-9)
        tokens = sum(reply.tokens for reply in self.replies)
        return {
            "replies_per_s": len(self.replies) / seconds,
            "tokens_per_s": tokens / seconds,
            "seconds": self.seconds,
            "generated_tokens": tokens,
        }


def cut_at_end_of_turn(row: list[int], end_of_turn: int) -> tuple[list[int], bool]:
    """A generated row up to and with its first end-of-turn token, and whether it has one."""
    if end_of_turn in row:
        return row[: row.index(end_of_turn) + 1], True
    return row, False


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    contexts: list[list[dict]],
    generation: GenerationArguments,
    batch_size: int,
    sample: bool,
    progress: bool = False,
) -> Generated:
    """Replies for each context, in length-sorted left-padded batches; sampling seeded with `generation.seed`.

    `progress` shows a bar of the replies done (long runs such as mining pairs)."""
    from tqdm.auto import tqdm
    from transformers import set_seed

    device = next(model.parameters()).device
    kwargs = generation_kwargs(tokenizer, generation, sample)
    tokenizer.padding_side = "left"
    prompts = [encode_prompt(tokenizer, render_prompt(tokenizer, messages))["input_ids"] for messages in contexts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[Reply | None] = [None] * len(prompts)
    set_seed(generation.seed)
    start = time.perf_counter()
    bar = tqdm(total=len(order), desc="generating", unit="reply", disable=not progress)
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        batch = tokenizer.pad({"input_ids": [prompts[i] for i in rows]}, return_tensors="pt").to(device)
        output = model.generate(**batch, **kwargs)
        for i, generated in zip(rows, output[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
            tokens, stopped = cut_at_end_of_turn(generated, tokenizer.eos_token_id)
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            replies[i] = Reply(text=text, tokens=len(tokens), stopped=stopped)
        bar.update(len(rows))
    bar.close()
    return Generated(replies=replies, seconds=time.perf_counter() - start)
