"""OpenAI-style errors: the ``ProtocolError`` every refusal becomes, the mapping of engine and
processor errors onto it (by type, never by message text), and the app's exception handlers.

    PromptTooLong     -> 400, param "messages" / "prompt", code "context_length_exceeded"
    InvalidParameter  -> 400, param = the request field (max_new_tokens -> max_tokens, ...)
    MediaError        -> 400, param "messages"
    other ValueError, TypeError, template errors -> 400 with their message
    anything else     -> 500 "server_error"; the details go to the server log only (guard.py)

Messages always render: text a client sent (a model name, a key) is echoed shortened, and any
lone surrogate in it is written as its escape, so the JSON encoder never fails on an error body.
"""
from __future__ import annotations

import sys
import traceback
from collections.abc import Mapping

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.api import ConstraintError, InvalidParameter, PromptTooLong
from ..processor.errors import MediaError


class ProtocolError(ValueError):
    """A request the API refuses; becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


MAX_MESSAGE_CHARS = 2000


def printable(text: str) -> str:
    """``text`` with lone surrogates as backslash escapes such as ``\\udc80`` (UTF-8 cannot encode them)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def short(value: object, limit: int = 80) -> str:
    """A client-sent value for an error message: repr'd, printable and at most ``limit`` characters."""
    text = printable(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    message = printable(message)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    param = None if param is None else printable(param)[:200]
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def as_protocol_error(e: Exception, prompt_param: str, names: Mapping[str, str]) -> ProtocolError:
    """A failure while turning a request into engine requests (bad media, template, settings,
    prompt too long) as a 400. ``prompt_param``: the field holding the prompt ("messages" or
    "prompt"); ``names``: SamplingParams field -> request field."""
    if isinstance(e, ProtocolError):
        return e
    if isinstance(e, InvalidParameter):
        return ProtocolError(e.describe(names), names.get(e.param, e.param))
    if isinstance(e, PromptTooLong):
        return ProtocolError(str(e), prompt_param, code="context_length_exceeded")
    if isinstance(e, MediaError):
        return ProtocolError(str(e), prompt_param)
    if isinstance(e, ConstraintError):  # a grammar that did not compile names its kind: say the field
        kinds = {"json_schema": "response_format", "json_object": "response_format", "tool_calls": "tool_choice"}
        return ProtocolError(str(e), kinds.get(e.param, e.param))
    return ProtocolError(str(e))


def engine_error_body(e: Exception) -> tuple[int, dict]:
    """(HTTP status, error body) for a request that failed inside the engine while generating."""
    if isinstance(e, PromptTooLong):
        return 400, error_body(str(e), code="context_length_exceeded")
    if isinstance(e, ValueError):
        return 400, error_body(str(e))
    # Unexpected: the details go to the server log, the client gets a plain message.
    log_internal_error("engine error", e)
    return 500, error_body("the engine failed while generating this request", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProtocolError)
    async def protocol_error(request, exc: ProtocolError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(404, f"unknown request URL: {request.method} {request.url.path}",
                                  code="not_found")
        if exc.status_code == 405:
            return error_response(405, f"method {request.method} is not allowed on {request.url.path}")
        return error_response(exc.status_code, str(exc.detail))


def log_internal_error(where: str, e: BaseException) -> None:
    """One line naming the failure, then its traceback: the server log only, never a response."""
    print(f"[qwen3vl serve] {printable(where)}: {type(e).__name__}: {printable(str(e))[:500]}", file=sys.stderr)
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    sys.stderr.flush()
