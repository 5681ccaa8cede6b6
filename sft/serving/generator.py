"""Generation for the server: one reply at a time on one loaded model, streamed, stoppable and cancellable.

Requests queue in front of a single generation thread, so two replies never run into each other's state (the
adapter switch, the random seed); a client that goes away stops its reply at the next token.
"""

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import AsyncTextIteratorStreamer, StoppingCriteria, set_seed

logger = logging.getLogger(__name__)


@dataclass
class Reply:
    """How a finished reply ended: token count and OpenAI's finish reason (`stop` or `length`)."""

    completion_tokens: int = 0
    finish_reason: str = "stop"


class Cancelled(StoppingCriteria):
    """Stops generation as soon as `event` is set (the client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def split_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The part of `text` that may be sent, and whether a stop string ended it.

    The text is cut before the first stop string; while none has appeared, a tail that could still become one is
    held back, so a stop string never reaches the client.
    """
    found = [text.find(stop) for stop in stops if stop in text]
    if found:
        return text[: min(found)], True
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[: len(text) - held], False


class Generator:
    """Generates replies with one model, the fine-tuned one or (for a PeftModel) the base with the adapter off."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.has_adapter = hasattr(model, "disable_adapter")
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def _generate(self, ids, kwargs, streamer, cancelled, seed, adapter, reply: Reply, label: str) -> None:
        """Run in the generation thread; always ends the stream, even when cancelled before it started."""
        started = time.monotonic()
        try:
            if cancelled.is_set():
                logger.info("%s: cancelled by the client before it started", label)
                return
            if seed is not None:
                set_seed(seed)
            input_ids = torch.tensor([ids], device=self.device)
            switch = contextlib.nullcontext() if adapter or not self.has_adapter else self.model.disable_adapter()
            with switch, torch.no_grad():
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    streamer=streamer,
                    stopping_criteria=[Cancelled(cancelled)],
                    tokenizer=self.tokenizer,
                    **kwargs,
                )
            new_tokens = output[0, len(ids) :].tolist()
            reply.completion_tokens = len(new_tokens)
            ended_by_eos = bool(new_tokens) and new_tokens[-1] == self.tokenizer.eos_token_id
            if len(new_tokens) >= kwargs["max_new_tokens"] and not ended_by_eos:
                reply.finish_reason = "length"
            ended = " (cancelled by the client)" if cancelled.is_set() else ""
            logger.info("%s: %d tokens in %.1f s%s", label, len(new_tokens), time.monotonic() - started, ended)
        finally:
            streamer.on_finalized_text("", stream_end=True)

    async def stream(self, ids: list[int], kwargs: dict, *, stop=(), seed=None, adapter=True, reply: Reply, label=""):
        """Yield the reply's text as it is generated; `reply` holds the token count once the stream ends.

        `label` names the request in the log, which never holds its text.

        Stop strings end the reply and are never sent; spaces around the reply are dropped as in `sft.serving.chat`.
        """
        stops = list(stop)
        if stops:
            kwargs = {**kwargs, "stop_strings": stops}
        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(
            self.worker, self._generate, ids, kwargs, streamer, cancelled, seed, adapter, reply, label
        )
        text, sent, stopped = "", 0, False
        try:
            async for piece in streamer:
                text = (text + piece).lstrip()
                visible, stopped = split_at_stop(text, stops)
                visible = visible.rstrip()  # trailing spaces wait for what follows them; the reply's last go
                if len(visible) > sent:
                    yield visible[sent:]
                    sent = len(visible)
                if stopped:
                    break
            await done  # raises what generation raised
            if stopped:
                reply.finish_reason = "stop"
            elif len(text.rstrip()) > sent:
                yield text.rstrip()[sent:]  # a held-back tail that never became a stop string
        finally:
            cancelled.set()  # the client went away, or a stop string ended the reply: stop at the next token
