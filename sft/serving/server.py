"""Serve a trained run over an OpenAI-compatible API, with a chat page comparing it with its base, on one port.

lccc-sft serve --model_path output/smoke                 # http://127.0.0.1:8000/ and /v1/chat/completions
SFT_API_KEY=secret lccc-sft serve --model_path output/smoke --host 0.0.0.0 --port 8080

One loaded model answers as two models: the fine-tuned one (the run folder's name) and its base (`<name>-base`,
the LoRA adapter switched off for that request). Requests waiting together for the same model are generated
together as one batch (`sft.serving.generator`).
"""

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool

from sft.common.errors import UserError, exits_cleanly_on_user_error
from sft.common.generation import GenerationArguments
from sft.common.inference import (
    TrainedModelArguments,
    default_device,
    encode_prompt,
    load_model,
    parse_generating_command,
    read_run,
    render_prompt,
    start_command_logging,
)
from sft.serving.api import ApiError, BodyLimit, ChatCompletionRequest, add_error_handlers, error_body
from sft.serving.chat import context_window
from sft.serving.generator import Decoding, Generator, Refused, Reply

logger = logging.getLogger(__name__)
API_KEY_ENV = "SFT_API_KEY"
PAGE = Path(__file__).resolve().parent / "static"
GREEDY_BELOW = 1e-5  # a lower temperature decodes greedily (as vLLM does): sampling would divide by almost 0


@dataclass
class ServeArguments:
    """Where the server listens, who may use it, and the names it serves under."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "Port of the API and the chat page."})
    api_key: str | None = field(
        default=None,
        metadata={"help": f"Require `Authorization: Bearer KEY` on the API (or set {API_KEY_ENV}, safer than a flag)."},
    )
    model_name: str | None = field(
        default=None, metadata={"help": "Id of the fine-tuned model (default: the run folder's name)."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt for requests without one (default: the recipe's)."}
    )
    max_batch_size: int = field(
        default=8, metadata={"help": "Most waiting requests generated together in one batch (1: one at a time)."}
    )
    max_body_mb: float = field(default=4.0, metadata={"help": "Largest request body accepted, in MB (else 413)."})
    shutdown_timeout: float = field(
        default=8.0,
        metadata={"help": "On SIGTERM, seconds the running replies may take to finish before they are cut."},
    )

    def __post_init__(self):
        if not 1 <= self.port <= 65535:
            raise UserError(f"--port must be in 1-65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api_key is empty: give a key, or leave the flag out to serve without one")
        if API_KEY_ENV in os.environ and not os.environ[API_KEY_ENV].strip():
            raise UserError(f"{API_KEY_ENV} is set but empty: set a key, or unset it to serve without one")


def check_address(host: str, port: int) -> None:
    """The address resolves and the port is free, before minutes of model loading (uvicorn binds the same way)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"--host {host} cannot be resolved ({err.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


@dataclass
class Service:
    """What the routes need: the loaded model's generator and the rules a request must follow."""

    generator: Generator
    tokenizer: object
    tuned_id: str
    base_id: str | None
    root: str
    context_window: int
    longest_token: int  # characters of the vocabulary's longest token: a prompt's length bounds its tokens
    defaults: GenerationArguments
    system_prompt: str | None = None
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def uses_adapter(self, model_id: str) -> bool:
        """True for the fine-tuned id, False for the base id; any other id is a 404 as in OpenAI."""
        if model_id in (self.tuned_id, self.base_id):
            return model_id == self.tuned_id
        served = ", ".join(i for i in (self.tuned_id, self.base_id) if i)
        raise ApiError(
            404,
            f"the model `{model_id}` does not exist; this server serves {served}",
            param="model",
            code="model_not_found",
        )

    def check_length(self, messages: list[dict]) -> None:
        """Refuse, before tokenizing, a conversation too long for the context however it tokenizes."""
        characters = sum(len(m["content"]) for m in messages)
        if characters > self.context_window * self.longest_token:
            message = (
                f"this model's maximum context length is {self.context_window} tokens; the messages take "
                f"{characters} characters, more than that many tokens can hold"
            )
            raise ApiError(400, message, param="messages", code="context_length_exceeded")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation in the run's chat template, up to where the reply starts."""
        if messages[-1]["role"] != "user":
            raise ApiError(400, "messages: the last message must be the user's", param="messages")
        if any(m["role"] == "system" for m in messages[1:]):
            raise ApiError(400, "messages: a system message may only come first", param="messages")
        if messages[0]["role"] != "system" and self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        try:
            return encode_prompt(self.tokenizer, render_prompt(self.tokenizer, messages))["input_ids"]
        except TemplateError as err:
            raise ApiError(400, f"messages: {err}", param="messages") from None

    def reply_budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The reply's token limit: the one asked for, or the server's default, within the context window."""
        room = self.context_window - prompt_tokens
        if room < 1 or (max_tokens or 0) > room:
            asked = f" and max_tokens asks for {max_tokens} more" if max_tokens else ""
            message = (
                f"this model's maximum context length is {self.context_window} tokens; the messages take "
                f"{prompt_tokens}{asked}"
            )
            param = "max_tokens" if room > 0 else "messages"
            raise ApiError(400, message, param=param, code="context_length_exceeded")
        return max_tokens or min(self.defaults.max_new_tokens, room)

    def decoding(self, request: ChatCompletionRequest, max_new_tokens: int) -> Decoding:
        """The request's settings, the server's where it gives none; a seed of -1 asks for a random one."""
        if request.min_tokens > max_new_tokens:
            message = f"min_tokens: {request.min_tokens} is more than the reply's limit of {max_new_tokens} tokens"
            raise ApiError(400, message, param="min_tokens")
        defaults = self.defaults
        temperature = defaults.temperature if request.temperature is None else request.temperature
        greedy = temperature < GREEDY_BELOW or (request.temperature is None and not defaults.do_sample)
        seed = defaults.seed if request.seed is None else request.seed
        top_k = defaults.top_k if request.top_k is None else max(request.top_k, 0)
        return Decoding(
            max_new_tokens=max_new_tokens,
            greedy=greedy,
            temperature=temperature,
            top_p=defaults.top_p if request.top_p is None else request.top_p,
            top_k=top_k,
            min_p=request.min_p,
            repetition_penalty=request.repetition_penalty or defaults.repetition_penalty,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            no_repeat_ngram_size=defaults.no_repeat_ngram_size,
            min_tokens=request.min_tokens,
            stop=request.stop_strings(),
            seed=None if seed == -1 else seed,
        )

    def check_key(self, authorization: str | None) -> None:
        expected = f"Bearer {self.api_key}".encode()
        if self.api_key and not hmac.compare_digest((authorization or "").encode(), expected):
            raise ApiError(401, "a valid API key is required: `Authorization: Bearer KEY`", code="invalid_api_key")

    def model_card(self, model_id: str) -> dict:
        """`GET /v1/models/{id}`: one entry of the list, or a 404 for an id this server does not serve."""
        self.uses_adapter(model_id)
        return next(card for card in self.model_cards() if card["id"] == model_id)

    def model_cards(self) -> list[dict]:
        """`/v1/models` entries; the fine-tuned model names the base it adapts as `parent` (as vLLM does)."""
        card = {"object": "model", "created": self.created, "owned_by": "lccc-sft", "root": self.root}
        cards = [{**card, "id": self.tuned_id, "parent": self.base_id}]
        return cards + ([{**card, "id": self.base_id, "parent": None}] if self.base_id else [])


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def hung_up(request: Request) -> None:
    """Return once the client has gone away (its connection closed)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_hung_up(request: Request, awaitable):
    """`awaitable`'s result, or None, having cancelled it, when the client hangs up first."""
    work, gone = asyncio.ensure_future(awaitable), asyncio.ensure_future(hung_up(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    return None


def build_app(service: Service, max_body_bytes: int = 4_000_000):
    """The FastAPI app: `GET /v1/models`, `POST /v1/chat/completions`, `GET /health` and the chat page at `/`."""
    app = FastAPI(title="lccc-sft", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    async def authorized(authorization: str | None = Header(default=None)) -> None:
        service.check_key(authorization)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": service.model_cards()}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str):
        return service.model_card(model_id)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: ChatCompletionRequest, connection: Request):
        request.check_supported()
        adapter = service.uses_adapter(request.model)
        turns = [message.as_turn(i) for i, message in enumerate(request.messages)]
        service.check_length(turns)
        ids = await run_in_threadpool(service.prompt_ids, turns)
        decoding = service.decoding(
            request, service.reply_budget(len(ids), request.max_tokens or request.max_completion_tokens)
        )
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        logger.info(
            "%s: %s, %d prompt tokens, at most %d new", completion_id, request.model, len(ids), decoding.max_new_tokens
        )
        reply = Reply()
        pieces = service.generator.stream(ids, decoding, adapter=adapter, reply=reply, label=completion_id)
        hung_up_response = Response(status_code=499)  # nginx's "client closed request": no one reads it
        try:
            if await unless_hung_up(connection, anext(pieces)) is None:  # the request's turn has come
                return hung_up_response
        except Refused:
            raise ApiError(503, "the server is shutting down; try again later", code="service_unavailable") from None

        def usage() -> dict:
            total = len(ids) + reply.completion_tokens
            return {"prompt_tokens": len(ids), "completion_tokens": reply.completion_tokens, "total_tokens": total}

        head = {"id": completion_id, "created": created, "model": request.model}
        if not request.stream:
            text = await unless_hung_up(connection, collect(pieces))
            if text is None:
                return hung_up_response
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage()}

        def chunk(delta: dict, finish_reason=None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for piece in pieces:
                    yield chunk({"content": piece})
                yield chunk({}, reply.finish_reason)
                if request.stream_options and request.stream_options.include_usage:
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage()})
            except Exception:
                logger.exception("%s: failed mid-stream", completion_id)
                yield sse(error_body("the server failed to finish the reply; see its log", kind="server_error"))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.mount("/", StaticFiles(directory=PAGE, html=True), name="page")
    return app


async def collect(pieces) -> str:
    return "".join([piece async for piece in pieces])


class Server(uvicorn.Server):
    """uvicorn's server; on SIGTERM (or Ctrl-C) the queued requests are refused (503) at once, the running batch
    finishes within `timeout_graceful_shutdown`, and the process exits."""

    def __init__(self, config: uvicorn.Config, generator: Generator):
        super().__init__(config)
        self.generator = generator

    def handle_exit(self, sig, frame) -> None:
        self.generator.close()
        super().handle_exit(sig, frame)


def open_to_others(host: str, api_key: str | None) -> bool:
    """True when the server would answer anyone who can reach a non-loopback address, with no API key."""
    if api_key or host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name: it may resolve to any interface


def load_service(where: TrainedModelArguments, options: ServeArguments, settings: GenerationArguments) -> Service:
    run = read_run(where.model_path, where.base_model)
    tokenizer = run.load_tokenizer()
    model = load_model(run, quantize=where.quantize, device=where.device or default_device())
    tuned_id = options.model_name or Path(where.model_path).resolve().name
    return Service(
        generator=Generator(model, tokenizer, max_batch_size=options.max_batch_size),
        tokenizer=tokenizer,
        tuned_id=tuned_id,
        base_id=f"{tuned_id}-base" if run.is_adapter else None,
        root=str(run.base_model or run.model_path),
        context_window=context_window(model),
        longest_token=max(len(token) for token in tokenizer.get_vocab()),
        defaults=settings,
        system_prompt=run.recipe.get("system_prompt") if options.system_prompt is None else options.system_prompt,
        api_key=options.api_key or os.environ.get(API_KEY_ENV) or None,
    )


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> None:
    # generation settings: the run's saved ones (what was evaluated), flags on top; each request may override them
    where, options, settings = parse_generating_command(
        ServeArguments, sys.argv[1:] if argv is None else argv, prog="lccc-sft serve"
    )
    check_address(options.host, options.port)
    start_command_logging()
    service = load_service(where, options, settings)
    served = " and ".join(f"`{i}`" for i in (service.tuned_id, service.base_id) if i)
    key = ", API key required" if service.api_key else ""
    logger.info("serving %s at http://%s:%d/ (chat page) and /v1 (API%s)", served, options.host, options.port, key)
    if open_to_others(options.host, service.api_key):
        logger.warning(
            "listening on %s without an API key: anyone who can reach this address can use the model; set %s",
            options.host,
            API_KEY_ENV,
        )
    app = build_app(service, max_body_bytes=int(options.max_body_mb * 1_000_000))
    config = uvicorn.Config(
        app, host=options.host, port=options.port, log_config=None, timeout_graceful_shutdown=options.shutdown_timeout
    )
    Server(config, service.generator).run()


if __name__ == "__main__":
    main()
