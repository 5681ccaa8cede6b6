"""Serve a trained run over an OpenAI-compatible API, with a chat page comparing it with its base, on one port.

lccc-sft serve --model_path output/smoke                 # http://127.0.0.1:8000/ and /v1/chat/completions
SFT_API_KEY=secret lccc-sft serve --model_path output/smoke --host 0.0.0.0 --port 8080

One loaded model answers as two models: the fine-tuned one (the run folder's name) and its base (`<name>-base`,
the LoRA adapter switched off for that request). Requests are answered one at a time, in order of arrival.
"""

import hmac
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, Header
from fastapi.responses import StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import TemplateError

from sft.common.errors import UserError, exits_cleanly_on_user_error
from sft.common.generation import GenerationArguments, generation_kwargs
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
from sft.serving.api import ApiError, ChatCompletionRequest, add_error_handlers
from sft.serving.chat import context_window
from sft.serving.generator import Generator, Reply

logger = logging.getLogger(__name__)
API_KEY_ENV = "SFT_API_KEY"
PAGE = Path(__file__).resolve().parent / "static"


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

    def settings(self, request, max_new_tokens: int) -> GenerationArguments:
        """The server's generation settings with the request's own; temperature 0 decodes greedily."""
        changes = {"max_new_tokens": max_new_tokens}
        if request.top_p is not None:
            changes["top_p"] = request.top_p
        if request.temperature == 0:
            changes["do_sample"] = False
        elif request.temperature is not None:
            changes.update(temperature=request.temperature, do_sample=True)
        return replace(self.defaults, **changes)

    def check_key(self, authorization: str | None) -> None:
        expected = f"Bearer {self.api_key}".encode()
        if self.api_key and not hmac.compare_digest((authorization or "").encode(), expected):
            raise ApiError(401, "a valid API key is required: `Authorization: Bearer KEY`", code="invalid_api_key")

    def model_cards(self) -> list[dict]:
        """`/v1/models` entries; the fine-tuned model names the base it adapts as `parent` (as vLLM does)."""
        card = {"object": "model", "created": self.created, "owned_by": "lccc-sft", "root": self.root}
        cards = [{**card, "id": self.tuned_id, "parent": self.base_id}]
        return cards + ([{**card, "id": self.base_id, "parent": None}] if self.base_id else [])


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(service: Service):
    """The FastAPI app: `GET /v1/models`, `POST /v1/chat/completions` and the chat page at `/`."""
    app = FastAPI(title="lccc-sft", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)

    async def authorized(authorization: str | None = Header(default=None)) -> None:
        service.check_key(authorization)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": service.model_cards()}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: ChatCompletionRequest):
        adapter = service.uses_adapter(request.model)
        ids = service.prompt_ids([m.model_dump() for m in request.messages])
        max_new_tokens = service.reply_budget(len(ids), request.max_tokens or request.max_completion_tokens)
        kwargs = generation_kwargs(service.tokenizer, service.settings(request, max_new_tokens))
        seed = request.seed if request.seed is not None else service.defaults.seed
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        logger.info("%s: %s, %d prompt tokens, at most %d new", completion_id, request.model, len(ids), max_new_tokens)
        reply = Reply()
        pieces = service.generator.stream(
            ids, kwargs, stop=request.stop_strings(), seed=seed, adapter=adapter, reply=reply, label=completion_id
        )

        def usage() -> dict:
            total = len(ids) + reply.completion_tokens
            return {"prompt_tokens": len(ids), "completion_tokens": reply.completion_tokens, "total_tokens": total}

        head = {"id": completion_id, "created": created, "model": request.model}
        if not request.stream:
            text = "".join([piece async for piece in pieces])
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage()}

        def chunk(delta: dict, finish_reason=None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            async for piece in pieces:
                yield chunk({"content": piece})
            yield chunk({}, reply.finish_reason)
            counts = usage()
            if request.stream_options and request.stream_options.include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": counts})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.mount("/", StaticFiles(directory=PAGE, html=True), name="page")
    return app


def load_service(where: TrainedModelArguments, options: ServeArguments, settings: GenerationArguments) -> Service:
    run = read_run(where.model_path, where.base_model)
    tokenizer = run.load_tokenizer()
    model = load_model(run, quantize=where.quantize, device=where.device or default_device())
    tuned_id = options.model_name or Path(where.model_path).resolve().name
    return Service(
        generator=Generator(model, tokenizer),
        tokenizer=tokenizer,
        tuned_id=tuned_id,
        base_id=f"{tuned_id}-base" if run.is_adapter else None,
        root=str(run.base_model or run.model_path),
        context_window=context_window(model),
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
    uvicorn.run(build_app(service), host=options.host, port=options.port, log_config=None)


if __name__ == "__main__":
    main()
