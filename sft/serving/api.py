"""The OpenAI chat-completions wire format the server speaks: requests, checked, and errors, as OpenAI sends them."""

from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictStr
from starlette.exceptions import HTTPException

MAX_STOP_STRINGS = 4  # as OpenAI


class ApiError(Exception):
    """A request the server cannot answer: sent as OpenAI's `{"error": {...}}` with a 4xx status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat-completions request this server uses; others are accepted and ignored."""

    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None

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
        kind = "authentication_error" if err.status == 401 else "invalid_request_error"
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
