"""The OpenAI-compatible HTTP app (FastAPI) and the web chat page.

One ``Engine`` runs continuous batching in its stepping loop (on the main thread under
``qwen3vl serve``, see ``serve.py``; uvicorn's event loop runs in a second thread); each HTTP
request becomes one engine request per choice, whose deltas the engine thread hands to the event
loop (``bridge.EngineBridge``). Prompt processing (media download and decoding, tokenizing) runs
in bounded worker pools, one for requests with media and one for text-only requests, so the event
loop never blocks and slow media never hold up text (pools.py). A request whose client goes away
is cancelled at once, which frees its KV slot at the engine's next step.

Around the routes: ``Guard`` (Host allow-list, catch-all 500s, quiet client disconnects), CORS
only with ``--allowed-origins``, and bodies checked by body.py (JSON content type, size,
shape, parsed in a worker). ``/openapi.json`` describes the endpoints (openapi.py).
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
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from ..engine.api import LLM, Request, Usage
from .body import parse_json, read_body
from .bridge import Builder, EngineBridge
from .chat_output import delta_bodies, message_body
from .errors import (ProtocolError, as_protocol_error, engine_error_body, error_body, error_response,
                     install_error_handlers, log_internal_error, short)
from .guard import Guard
from .limits import RequestLimits
from .openapi import openapi_document
from .pools import BoundedPool
from .protocol import (FIELD_NAMES, GenerationRequest, MediaPolicy, ResponseHead, chat_choice, chat_chunk_choice,
                       completion_choice, new_id, parse_chat_request, parse_completion_request, usage_body)
from .settings import ServeSettings

STATIC = os.path.join(os.path.dirname(__file__), "static")
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there
START_TIME = time.time()
# Text-only requests only template and tokenize (bounded by the prompt character cap): a few
# threads keep up with any engine; the backlog absorbs bursts.
TEXT_WORKERS, TEXT_BACKLOG = 4, 64
MEDIA_BACKLOG_PER_WORKER = 8


# ---------------------------------------------------------------------------- serving
class Server:
    """The endpoints' logic, shared by chat and completions."""

    def __init__(self, llm: LLM, settings: ServeSettings):
        self.llm, self.model_name = llm, settings.model_name
        self.names = {self.model_name} | settings.aliases
        self.policy = MediaPolicy(settings.allowed_local_media_path)
        self.limits = RequestLimits(llm.engine.max_model_len, settings.max_images, settings.max_videos)
        self.max_body_bytes = settings.max_body_bytes
        self.bridge, self.builder = EngineBridge(llm), Builder(llm)
        self.thinking = llm.thinking  # reasoning fields in every chat answer
        self.text_pool = BoundedPool("text", TEXT_WORKERS, TEXT_BACKLOG)
        self.media_pool = BoundedPool("media", settings.media_workers,
                                      settings.media_workers * MEDIA_BACKLOG_PER_WORKER)

    async def generate(self, http: HTTPRequest, kind: str):
        stream, include_usage, reqs = await self._prepare(http, kind)
        head = ResponseHead(new_id("chatcmpl" if kind == "chat" else "cmpl"), self.model_name,
                            "chat.completion" if kind == "chat" else "text_completion")
        queue = self.bridge.submit(reqs, final_only=not stream)
        if stream:
            return StreamingResponse(self._stream(http, head, kind, reqs, queue, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(http, head, kind, reqs, queue)

    async def _prepare(self, http: HTTPRequest, kind: str) -> tuple[bool, bool, list[Request]]:
        """(stream, include_usage, engine requests). A function of its own so that the body, the
        parsed JSON and its data: URIs are freed once the engine requests exist, not held while generating."""
        raw = await read_body(http, self.max_body_bytes)
        # Parsing up to 32 MiB of JSON takes up to a second: a worker's job, not the event loop's.
        greq = await self.text_pool.run(self._parse, raw, kind)
        del raw
        build = self.builder.chat if kind == "chat" else self.builder.completion
        pool = self.media_pool if greq.media else self.text_pool
        try:
            reqs = await pool.run(build, greq)
        except (ValueError, TypeError, jinja2.TemplateError) as e:
            raise as_protocol_error(e, "messages" if kind == "chat" else "prompt", FIELD_NAMES) from None
        return greq.stream, greq.include_usage, reqs

    def _parse(self, raw: bytes, kind: str) -> GenerationRequest:
        body = parse_json(raw)
        if kind == "chat":
            greq = parse_chat_request(body, self.policy, self.limits)
        else:
            greq = parse_completion_request(body, self.limits)
        if greq.model is not None and greq.model not in self.names:
            raise ProtocolError(f"the model {short(greq.model)} does not exist (this server serves "
                                f"'{self.model_name}')", "model", status=404, code="model_not_found")
        return greq

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
        if kind == "chat":
            choices = [chat_choice(i, message_body(r.result, self.thinking), r.result.finish_reason)
                       for i, r in enumerate(reqs)]
        else:
            choices = [completion_choice(i, r.result.text, r.result.finish_reason) for i, r in enumerate(reqs)]
        return JSONResponse(head.body(choices, usage_body(_distinct_usages(reqs))))

    async def _stream(self, http, head: ResponseHead, kind: str, reqs: list[Request], queue,
                      include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list, usage=None) -> str:
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            body = {**head.body(choices, usage, include_usage), "object": obj}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def pieces(i: int, delta) -> list[str]:
            if kind == "chat":
                return [chunk([chat_chunk_choice(i, body)]) for body in delta_bodies(delta)]
            return [chunk([completion_choice(i, delta.text, None)])] if delta.text else []

        def last(i: int, reason: str | None) -> str:
            return chunk([chat_chunk_choice(i, {}, reason) if kind == "chat" else completion_choice(i, "", reason)])

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
                for text in pieces(i, delta):
                    yield text
                if delta.finished:
                    done += 1
                    if reqs[i].error is not None:
                        yield f"data: {json.dumps(engine_error_body(reqs[i].error)[1])}\n\n"
                        break
                    yield last(i, delta.result.finish_reason)
            if include_usage:
                yield chunk([], usage_body(_distinct_usages(reqs)))
            yield "data: [DONE]\n\n"
        except Exception as e:  # the status line is gone already: end the stream with an error event
            log_internal_error("internal error while streaming", e)
            yield f"data: {json.dumps(error_body('internal server error', 'server_error'))}\n\n"
        finally:
            watcher.cancel()
            self.bridge.cancel(reqs)  # client gone or stream cut: free the slots now


def _distinct_usages(reqs: list[Request]) -> list[Usage]:
    """Usages with the prompt of n choices counted once (as OpenAI counts it)."""
    out = []
    for r in reqs:
        u = r.result.usage if r.result is not None else r.usage
        out.append(Usage(0 if r.shares_prompt else u.prompt_tokens, u.completion_tokens,
                         cached_tokens=0 if r.shares_prompt else u.cached_tokens))
    return out


# ---------------------------------------------------------------------------- the app
def create_app(llm: LLM, settings: ServeSettings) -> FastAPI:
    """The FastAPI app over a loaded ``LLM`` (whose engine loop the caller runs: ``Engine.run_forever``)."""
    app = FastAPI(title="qwen3vl", docs_url=None, redoc_url=None, openapi_url=None)
    server = Server(llm, settings)
    app.state.server = server
    authorize = _authorizer(settings.api_key)
    install_error_handlers(app)
    with open(os.path.join(STATIC, "chat.html"), encoding="utf-8") as f:
        page = f.read()
    engine, model_name = llm.engine, settings.model_name
    openapi = openapi_document(model_name)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "demo": llm.is_demo, **asdict(engine.stats()),
                "max_num_seqs": engine.max_num_seqs, "max_model_len": engine.max_model_len,
                "preparing": {"text": server.text_pool.pending, "media": server.media_pool.pending}}

    @app.get("/openapi.json")
    async def openapi_json():
        return openapi

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

    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, allowed_hosts=settings.host_allow_list())  # added last: the outermost
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
