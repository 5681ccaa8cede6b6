"""Generation for the server: the requests waiting together generated as one batch, each row streamed, stoppable
and cancellable on its own, with its own settings and its own random generator.

Requests queue in front of a single generation thread. It takes the oldest request and every other waiting one
for the same model (adapter on or off), left-pads their prompts and runs one `generate` over them: a per-row logits
processor applies each request's settings and draws its token from the request's own seeded generator (so a seeded
reply does not depend on its neighbours), and a per-row stopping criterion streams each new token and ends a row at
its end-of-turn token, its stop strings, its token limit or when its client goes away.
"""

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import (
    AsyncTextIteratorStreamer,
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

logger = logging.getLogger(__name__)


class Refused(Exception):
    """The server is shutting down: a request that had not started will not be answered."""


@dataclass
class Reply:
    """How a finished reply ended: token count and OpenAI's finish reason (`stop` or `length`)."""

    completion_tokens: int = 0
    finish_reason: str = "stop"


@dataclass
class Decoding:
    """One request's decoding settings; a temperature of 0 (or `greedy`) decodes greedily."""

    max_new_tokens: int
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def processors(self, prompt_length: int, eos_token_id, device) -> list:
        """transformers' logits processors for these settings, applied to this request's row only."""
        chosen = []
        if self.min_tokens:
            chosen.append(MinNewTokensLengthLogitsProcessor(prompt_length, self.min_tokens, eos_token_id, device))
        if self.repetition_penalty != 1.0:
            chosen.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.frequency_penalty or self.presence_penalty:
            chosen.append(OpenAIPenalties(prompt_length, self.frequency_penalty, self.presence_penalty))
        if self.no_repeat_ngram_size:
            chosen.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        if not self.greedy:
            chosen.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                chosen.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                chosen.append(TopPLogitsWarper(self.top_p))
            if self.min_p > 0:
                chosen.append(MinPLogitsWarper(self.min_p))
        return chosen


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties: subtracted from the logits of tokens already in the reply."""

    def __init__(self, prompt_length: int, frequency: float, presence: float):
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        reply = input_ids[:, self.prompt_length :]
        counts.scatter_add_(1, reply, torch.ones_like(reply, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


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


@dataclass
class Job:
    """One request from the queue to its last token: what to generate, and where its text and outcome go."""

    ids: list[int]
    decoding: Decoding
    adapter: bool
    label: str
    streamer: AsyncTextIteratorStreamer
    reply: Reply
    cancelled: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    started: bool = False
    ended: bool = False

    def end(self, error: BaseException | None = None) -> None:
        """Close the request's stream (once), with the error that ended it if any."""
        if not self.ended:
            self.ended, self.error = True, error
            self.streamer.end()  # sends the text still held for a whole character, then the end


class ChooseTokens(LogitsProcessor):
    """Each row's next token under its own request's settings and random generator, as the row's only finite score."""

    def __init__(self, jobs: list[Job], padding: list[int], eos_token_id: int, device, done):
        self.jobs, self.padding, self.eos, self.done = jobs, padding, eos_token_id, done
        self.processors = [j.decoding.processors(len(j.ids), eos_token_id, device) for j in jobs]
        self.random = [torch.Generator(device=device) for _ in jobs]
        for generator, job in zip(self.random, jobs, strict=True):
            generator.manual_seed(job.decoding.seed) if job.decoding.seed is not None else generator.seed()

    def __call__(self, input_ids, scores):
        chosen = torch.full_like(scores, -float("inf"))
        for i, job in enumerate(self.jobs):
            if self.done[i]:
                chosen[i, self.eos] = 0  # generate pads an ended row anyway
                continue
            row = scores[i : i + 1].float()
            for processor in self.processors[i]:
                row = processor(input_ids[i : i + 1, self.padding[i] :], row)
            if job.decoding.greedy:
                token = row.argmax(dim=-1)
            else:
                token = torch.multinomial(row.softmax(dim=-1), 1, generator=self.random[i])[0]
            chosen[i, token] = 0
        return chosen


class EndRows(StoppingCriteria):
    """Streams each row's new token and ends the row at its end-of-turn token, a stop string, its token limit or
    when its client went away; `generate` runs until every row has ended."""

    def __init__(self, jobs: list[Job], padding: list[int], tokenizer, done):
        self.jobs, self.padding, self.eos, self.done = jobs, padding, tokenizer.eos_token_id, done
        self.stop_strings = [StopStringCriteria(tokenizer, j.decoding.stop) if j.decoding.stop else None for j in jobs]

    def __call__(self, input_ids, scores, **kwargs):
        for i, job in enumerate(self.jobs):
            if self.done[i]:
                continue
            token = int(input_ids[i, -1])
            job.reply.completion_tokens += 1
            job.streamer.put(torch.tensor([token]))
            stops = self.stop_strings[i]
            if token == self.eos or job.cancelled.is_set():
                self.finish(i, "stop")
            elif stops is not None and bool(stops(input_ids[i : i + 1, self.padding[i] :], scores)[0]):
                self.finish(i, "stop")
            elif job.reply.completion_tokens >= job.decoding.max_new_tokens:
                self.finish(i, "length")
        return self.done.clone()

    def finish(self, i: int, reason: str) -> None:
        job = self.jobs[i]
        self.done[i] = True
        job.reply.finish_reason = reason
        ended = " (cancelled by the client)" if job.cancelled.is_set() else ""
        logger.info("%s: %d tokens%s", job.label, job.reply.completion_tokens, ended)
        job.end()


class Generator:
    """Generates replies with one model, the fine-tuned one or (for a PeftModel) the base with the adapter off."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.has_adapter = hasattr(model, "disable_adapter")
        self.max_batch_size = max_batch_size
        self.waiting: deque[Job] = deque()
        self.changed = threading.Condition()
        self.closed = False
        self.generated_tokens = 0
        threading.Thread(target=self._work, name="generate", daemon=True).start()

    def close(self) -> None:
        """Refuse every request that has not started; the running batch finishes. Safe from a signal handler."""
        with self.changed:
            self.closed = True
            refused, self.waiting = list(self.waiting), deque()
            self.changed.notify_all()
        for job in refused:
            job.end(Refused())
        if refused:
            logger.info("shutting down: %d queued request(s) refused", len(refused))

    def _next_batch(self) -> list[Job]:
        """Wait for a request; take it with every other waiting one for the same model, up to the batch size."""
        with self.changed:
            while not self.waiting:
                self.changed.wait()
            first = self.waiting.popleft()
            batch = [first]
            for job in list(self.waiting):
                if len(batch) < self.max_batch_size and job.adapter == first.adapter:
                    self.waiting.remove(job)
                    batch.append(job)
        return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            for job in batch:
                if job.cancelled.is_set():
                    logger.info("%s: cancelled by the client before it started", job.label)
                    job.end()
            batch = [job for job in batch if not job.ended]
            if not batch:
                continue
            started = time.monotonic()
            try:
                self._generate(batch)
            except Exception as err:  # noqa: BLE001 - the request's handler reports it; the thread keeps serving
                logger.exception("generation failed for %s", ", ".join(job.label for job in batch))
                for job in batch:
                    job.end(err)
            tokens = sum(job.reply.completion_tokens for job in batch)
            self.generated_tokens += tokens
            logger.info("batch of %d: %d tokens in %.1f s", len(batch), tokens, time.monotonic() - started)

    def _generate(self, batch: list[Job]) -> None:
        """One `generate` over the batch's left-padded prompts; every row's stream ends, however it ends."""
        longest = max(len(job.ids) for job in batch)
        padding = [longest - len(job.ids) for job in batch]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * p + job.ids for p, job in zip(padding, batch, strict=True)])
        attention_mask = torch.tensor([[0] * p + [1] * len(job.ids) for p, job in zip(padding, batch, strict=True)])
        done = torch.zeros(len(batch), dtype=torch.bool, device=self.device)
        ends = EndRows(batch, padding, self.tokenizer, done)
        choose = ChooseTokens(batch, padding, self.tokenizer.eos_token_id, self.device, done)
        for job in batch:
            job.started = True
            job.streamer.on_finalized_text("")  # the request has started: its stream may open
        adapter = batch[0].adapter
        switch = contextlib.nullcontext() if adapter or not self.has_adapter else self.model.disable_adapter()
        with switch, torch.no_grad():
            self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                max_new_tokens=max(job.decoding.max_new_tokens for job in batch),
                do_sample=False,  # each row's token is drawn by `ChooseTokens`
                num_beams=1,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=pad,
                logits_processor=LogitsProcessorList([choose]),
                stopping_criteria=StoppingCriteriaList([ends]),
            )
        for i in range(len(batch)):
            if not done[i]:
                ends.finish(i, "length")

    async def stream(self, ids: list[int], decoding: Decoding, *, adapter=True, reply: Reply, label=""):
        """Yield "" when generation starts, then the reply's text as it is generated; `reply` holds the token count
        once the stream ends. Raises `Refused` when the server shuts down before the request started.

        `label` names the request in the log, which never holds its text.

        Stop strings end the reply and are never sent; spaces around the reply are dropped as in `sft.serving.chat`.
        """
        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_special_tokens=True)
        job = Job(ids, decoding, adapter, label, streamer, reply)
        with self.changed:
            if self.closed:
                raise Refused()
            self.waiting.append(job)
            self.changed.notify_all()
        text, sent, stopped, started = "", 0, False, False
        try:
            async for piece in streamer:
                if not started and job.started:
                    started = True
                    yield ""
                text = (text + piece).lstrip()
                visible, stopped = split_at_stop(text, decoding.stop)
                visible = visible.rstrip()  # trailing spaces wait for what follows them; the reply's last go
                if len(visible) > sent:
                    yield visible[sent:]
                    sent = len(visible)
                if stopped:
                    break
            if job.error is not None:
                raise job.error
            if stopped:
                reply.finish_reason = "stop"
            elif len(text.rstrip()) > sent:
                yield text.rstrip()[sent:]  # a held-back tail that never became a stop string
        finally:
            job.cancelled.set()  # the client went away, or a stop string ended the reply: stop at the next token
