"""The OpenAI chat-completions wire format the server speaks: requests, checked, and errors, as OpenAI sends them."""

import re
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, StrictStr
from starlette.exceptions import HTTPException

MAX_STOP_STRINGS = 4  # as OpenAI


class ApiError(Exception):
    """A request the server cannot answer: sent as OpenAI's `{"error": {...}}` with a 4xx status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def without_lone_surrogates(text: str) -> str:
    """The text with any lone UTF-16 surrogate (valid JSON, not valid Unicode text) replaced by U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if UNPAIRED.search(text) else text


UNPAIRED = re.compile("[\ud800-\udfff]")
Text = Annotated[StrictStr, AfterValidator(without_lone_surrogates)]


def message_text(content):
    """A message's content as one string: a string, a list of text parts (joined by newlines, as vLLM does) or
    None (an assistant message without text)."""
    if content is None:
        return None
    if isinstance(content, str):
        return without_lone_surrogates(content)
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        if any(part.get("type") != "text" for part in content):
            raise ValueError('only text parts (`{"type": "text", "text": ...}`) are supported')
        if all(isinstance(part.get("text"), str) for part in content):
            return "\n".join(without_lone_surrogates(part["text"]) for part in content)
    raise ValueError("must be a string or a list of text parts")


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | None, PlainValidator(message_text)] = None
    tool_calls: list | None = None

    def as_turn(self, index: int) -> dict:
        """The message as the chat template takes it: `developer` is the system message (as OpenAI maps it)."""
        if self.tool_calls:
            raise ApiError(
                400, f"messages[{index}].tool_calls: tools are not supported", param=f"messages[{index}].tool_calls"
            )
        if self.content is None and self.role != "assistant":
            raise ApiError(400, f"messages[{index}].content: required", param=f"messages[{index}].content")
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content or ""}


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields a client may send that would change the answer, with the values that ask for nothing: anything else is a
# 400 naming the field (as vLLM answers), never silently ignored.
UNSUPPORTED = {
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "best_of": (1,),
    "use_beam_search": (False,),
}


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat-completions request this server uses (plus vLLM's `top_k`, `min_p`, `min_tokens`
    and `repetition_penalty`); the unsupported ones in `UNSUPPORTED` are refused, others ignored."""

    model_config = ConfigDict(extra="allow")

    model: Text
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)

    def check_supported(self) -> None:
        """A 400 naming the first field asking for what this server does not do."""
        extra = self.model_extra or {}
        for name, harmless in UNSUPPORTED.items():
            if extra.get(name) is not None and extra[name] not in harmless:
                raise ApiError(400, f"{name}: not supported by this server", param=name)
        if self.n > 1:
            raise ApiError(400, "n: only one choice (n=1) is supported by this server", param="n")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings", param="stop")
        return [stop for stop in stops if stop]


def error_body(message: str, *, param=None, code=None, kind="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def param_name(location) -> str:
    """`("body", "messages", 0, "role")` as OpenAI names it: `messages[0].role`."""
    name = ""
    for part in location:
        if part == "body":
            continue
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name


def validation_error(errors) -> tuple[str, str | None]:
    """One message for the first problem pydantic found (never echoing what the user sent)."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})", None
    param = param_name(first["loc"]) or None
    if first["type"] == "missing" and param:
        return f"{param}: required", param
    return (f"{param}: {first['msg']}" if param else f"the request body is invalid: {first['msg']}"), param


def add_error_handlers(app: FastAPI) -> None:
    """Every error, ours, pydantic's or the router's, as OpenAI's JSON error with its status."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        kind = {401: "authentication_error"}.get(
            err.status, "server_error" if err.status >= 500 else "invalid_request_error"
        )
        return JSONResponse(error_body(err.message, param=err.param, code=err.code, kind=kind), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        message, param = validation_error(err.errors())
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        return JSONResponse(
            error_body("the server failed to answer; see its log", kind="server_error"), status_code=500
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return JSONResponse(error_body(str(err.detail)), status_code=err.status_code, headers=err.headers)


class BodyLimit:
    """ASGI middleware refusing a request body over `max_bytes` with OpenAI's error JSON and a 413: by its
    Content-Length before reading any of it, or, for a chunked body, as soon as it grows past the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        if b"content-length" in headers:
            declared = headers[b"content-length"]
            if not declared.isdigit() or int(declared) > self.max_bytes:
                return await self.refuse(scope, receive, send)
        elif b"transfer-encoding" in headers:
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                body, more = body + message.get("body", b""), message.get("more_body", False)
                if len(body) > self.max_bytes:
                    return await self.refuse(scope, receive, send)
            receive = replay(body, receive)
        await self.app(scope, receive, send)

    async def refuse(self, scope, receive, send):
        message = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        await JSONResponse(error_body(message), status_code=413)(scope, receive, send)


def replay(body: bytes, receive):
    """An ASGI `receive` giving `body` as one message, then what `receive` gives (the client's disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
