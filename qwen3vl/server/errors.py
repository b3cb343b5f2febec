"""OpenAI-style errors: the ``ProtocolError`` every refusal becomes, the mapping of engine and
processor errors onto it (by type, never by message text), and the app's exception handlers.

    PromptTooLong     -> 400, param "messages" / "prompt", code "context_length_exceeded"
    InvalidParameter  -> 400, param = the request field (max_new_tokens -> max_tokens, ...)
    MediaError        -> 400, param "messages"
    other ValueError, TypeError, template errors -> 400 with their message
    anything else     -> 500 "server_error"; the details go to the server log only
"""
from __future__ import annotations

import sys
import traceback
from collections.abc import Mapping

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.api import InvalidParameter, PromptTooLong
from ..processor.errors import MediaError


class ProtocolError(ValueError):
    """A request the API refuses; becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
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
    return ProtocolError(str(e))


def engine_error_body(e: Exception) -> tuple[int, dict]:
    """(HTTP status, error body) for a request that failed inside the engine while generating."""
    if isinstance(e, PromptTooLong):
        return 400, error_body(str(e), code="context_length_exceeded")
    if isinstance(e, ValueError):
        return 400, error_body(str(e))
    # Unexpected: the details go to the server log, the client gets a plain message.
    print("[qwen3vl serve] engine error:", file=sys.stderr)
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
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

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        # Starlette re-raises it afterwards, so the traceback reaches the server log, never the client.
        return error_response(500, "internal server error", "server_error")
