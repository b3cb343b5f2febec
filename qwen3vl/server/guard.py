"""The outermost layer of the app (plain ASGI, so streaming responses pass through untouched):

* the ``Host`` header must be on the allow-list (``ServeSettings.host_allow_list``), else 421: a
  page on another site that rebinds its own DNS name to 127.0.0.1 reaches a local server with
  that name in ``Host``;
* any exception the handlers did not turn into a response becomes an OpenAI-style 500 with a
  plain message, logged once (one line and the traceback) on the server side;
* a client that went away while its body was uploading is not an error: nothing is logged.
"""
from __future__ import annotations

import json

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body, log_internal_error, short


def host_name(header: str) -> str:
    """The host part of a Host header, lower case: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    name, sep, port = header.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else header


class Guard:
    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str] | None):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.allowed_hosts is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(host).rstrip(".") not in self.allowed_hosts:
                return await _send_json(send, 421, error_body(
                    f"the Host header {short(host)} is not one this server answers to (allowed: "
                    f"{', '.join(sorted(self.allowed_hosts))}); start it with --allowed-hosts NAME to accept "
                    "another name", param="Host", code="host_not_allowed"))
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            return  # the client hung up mid-upload: there is nobody to answer
        except Exception as e:
            log_internal_error(f"internal error on {scope.get('method')} {scope.get('path')}", e)
            if not started:
                await _send_json(send, 500, error_body("internal server error", "server_error"))


async def _send_json(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
