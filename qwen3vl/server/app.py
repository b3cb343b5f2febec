"""The OpenAI-compatible HTTP app (FastAPI) and the web chat page.

One ``Engine`` runs continuous batching in its stepping loop (on the main thread under
``qwen3vl serve``, see ``serve.py``; uvicorn's event loop runs in a second thread); each HTTP
request becomes one engine request per choice, whose deltas the engine thread hands to the event
loop (``bridge.EngineBridge``). Prompt processing (media download and decoding, tokenizing) runs
in worker threads so the event loop never blocks. A request whose client goes away is cancelled at
once, which frees its KV slot at the engine's next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

import jinja2
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from ..engine.api import LLM, Request, Usage
from .bridge import Builder, EngineBridge
from .errors import (ProtocolError, as_protocol_error, engine_error_body, error_response,
                     install_error_handlers)
from .protocol import (FIELD_NAMES, MediaPolicy, ResponseHead, chat_choice, chat_chunk_choice, completion_choice,
                       new_id, parse_chat_request, parse_completion_request, usage_body)

STATIC = os.path.join(os.path.dirname(__file__), "static")
MAX_BODY_BYTES = 256 << 20
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there
START_TIME = time.time()


# ---------------------------------------------------------------------------- serving
class Server:
    """The endpoints' logic, shared by chat and completions."""

    def __init__(self, llm: LLM, model_name: str, aliases: set[str], policy: MediaPolicy):
        self.llm, self.model_name, self.names = llm, model_name, {model_name} | aliases
        self.policy = policy
        self.bridge, self.builder = EngineBridge(llm), Builder(llm)

    async def generate(self, http: HTTPRequest, kind: str):
        body = await _json_body(http)
        greq = parse_chat_request(body, self.policy) if kind == "chat" else parse_completion_request(body)
        if greq.model is not None and greq.model not in self.names:
            raise ProtocolError(f"the model '{greq.model}' does not exist (this server serves "
                                f"'{self.model_name}')", "model", status=404, code="model_not_found")
        build = self.builder.chat if kind == "chat" else self.builder.completion
        try:
            reqs = await asyncio.to_thread(build, greq)
        except (ValueError, TypeError, jinja2.TemplateError) as e:
            raise as_protocol_error(e, "messages" if kind == "chat" else "prompt", FIELD_NAMES) from None
        head = ResponseHead(new_id("chatcmpl" if kind == "chat" else "cmpl"), self.model_name,
                            "chat.completion" if kind == "chat" else "text_completion")
        queue = self.bridge.submit(reqs, final_only=not greq.stream)
        if greq.stream:
            return StreamingResponse(self._stream(http, head, kind, reqs, queue, greq.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(http, head, kind, reqs, queue)

    @staticmethod
    def _watch(http: HTTPRequest, queue: asyncio.Queue) -> asyncio.Task:
        """A task that puts None into ``queue`` once the client has gone away."""
        async def watch() -> None:
            while not await http.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            queue.put_nowait(None)
        return asyncio.create_task(watch())

    async def _collect(self, http, head: ResponseHead, kind: str, reqs: list[Request], queue) -> JSONResponse:
        watcher = self._watch(http, queue)
        try:
            while any(r.result is None for r in reqs):
                if await queue.get() is None:
                    return error_response(499, "client closed the request")
        finally:
            watcher.cancel()
            self.bridge.cancel(reqs)
        failed = next((r.error for r in reqs if r.error is not None), None)
        if failed is not None:
            status, body = engine_error_body(failed)
            return JSONResponse(body, status_code=status)
        make = chat_choice if kind == "chat" else completion_choice
        choices = [make(i, r.result.text, r.result.finish_reason) for i, r in enumerate(reqs)]
        return JSONResponse(head.body(choices, usage_body(_distinct_usages(reqs))))

    async def _stream(self, http, head: ResponseHead, kind: str, reqs: list[Request], queue,
                      include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list, usage=None) -> str:
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            body = {**head.body(choices, usage, include_usage), "object": obj}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def piece(i: int, text: str | None, reason: str | None = None) -> dict:
            if kind == "chat":
                return chat_chunk_choice(i, {} if text is None else {"content": text}, reason)
            return completion_choice(i, text or "", reason)

        watcher = self._watch(http, queue)  # Starlette also cancels this generator on disconnect
        try:
            if kind == "chat":
                yield chunk([chat_chunk_choice(i, {"role": "assistant", "content": ""}) for i in range(len(reqs))])
            done = 0
            while done < len(reqs):
                item = await queue.get()
                if item is None:
                    return
                i, delta = item
                if delta.text:
                    yield chunk([piece(i, delta.text)])
                if delta.finished:
                    done += 1
                    if reqs[i].error is not None:
                        yield f"data: {json.dumps(engine_error_body(reqs[i].error)[1])}\n\n"
                        break
                    yield chunk([piece(i, None, delta.result.finish_reason)])
            if include_usage:
                yield chunk([], usage_body(_distinct_usages(reqs)))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self.bridge.cancel(reqs)  # client gone or stream cut: free the slots now


def _distinct_usages(reqs: list[Request]) -> list[Usage]:
    """Usages with the prompt of n choices counted once (as OpenAI counts it)."""
    out = []
    for r in reqs:
        u = r.result.usage if r.result is not None else r.usage
        out.append(Usage(0 if r.shares_prompt else u.prompt_tokens, u.completion_tokens))
    return out


async def _json_body(http: HTTPRequest):
    # Read with a cap: a request's media arrive inline (data: URIs), but memory is not unlimited.
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ProtocolError(f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB", status=413,
                                code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the request body is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------- the app
def create_app(llm: LLM, model_name: str, api_key: str | None = None, allowed_local_media_path: str | None = None,
               aliases: set[str] | None = None) -> FastAPI:
    """The FastAPI app over a loaded ``LLM`` (whose engine loop the caller runs: ``Engine.run_forever``)."""
    app = FastAPI(title="qwen3vl", docs_url=None, redoc_url=None, openapi_url=None)
    server = Server(llm, model_name, set(aliases or ()), MediaPolicy(allowed_local_media_path))
    app.state.server = server
    authorize = _authorizer(api_key)
    install_error_handlers(app)
    with open(os.path.join(STATIC, "chat.html"), encoding="utf-8") as f:
        page = f.read()
    engine = llm.engine

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "demo": llm.is_demo, **asdict(engine.stats()),
                "max_num_seqs": engine.max_num_seqs, "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models(http: HTTPRequest):
        authorize(http)
        card = {"id": model_name, "object": "model", "created": int(START_TIME), "owned_by": "qwen3vl",
                "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        authorize(http)
        return await server.generate(http, "chat")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        authorize(http)
        return await server.generate(http, "completion")

    return app


def _authorizer(api_key: str | None):
    """A check for the /v1 routes (the page and /health stay open; the page asks for the key)."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    def check(http: HTTPRequest) -> None:
        if expected is not None:
            given = http.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ProtocolError("missing or incorrect API key (send 'Authorization: Bearer KEY')",
                                    status=401, code="invalid_api_key")
    return check
