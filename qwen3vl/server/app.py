"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) and the web chat page.

    qwen3vl serve --model PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY]

One ``Engine`` runs continuous batching in its stepping loop (on the main thread under
``qwen3vl serve``, uvicorn's event loop in a second thread); each HTTP request becomes one engine
request per choice, whose deltas the engine thread hands to the event loop
(``call_soon_threadsafe`` into an ``asyncio.Queue``). Prompt processing (media download and
decoding, tokenizing) runs in worker threads so the event loop never blocks. A request whose
client goes away is aborted at once, which frees its KV slot at the engine's next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator

import jinja2
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.request import Delta, Request
from ..processor.errors import MediaError
from .protocol import (GenerationRequest, MediaPolicy, ProtocolError, ResponseHead, chat_choice,
                       chat_chunk_choice, completion_choice, error_body, new_id, parse_chat_request,
                       parse_completion_request, usage_body)

STATIC = os.path.join(os.path.dirname(__file__), "static")
MAX_BODY_BYTES = 256 << 20
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there
# SamplingParams field -> the request field a user wrote, for error messages.
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


# ---------------------------------------------------------------------------- engine bridge
class EngineBridge:
    """Submits requests to the engine thread and delivers their deltas to asyncio queues."""

    def __init__(self, llm):
        self.llm, self.engine = llm, llm.engine

    def submit(self, reqs: list[Request], final_only: bool = False) -> asyncio.Queue:
        """Start ``reqs``; the queue receives ``(choice index, Delta)`` from the engine thread
        (only the last Delta of each with ``final_only``: no event-loop wake-up per token)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def listener(delta: Delta, index: int) -> None:
            if final_only and not delta.finished:
                return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, delta))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        for i, req in enumerate(reqs):
            self.engine.add(req, lambda d, i=i: listener(d, i))
        return queue

    def abort(self, reqs: list[Request]) -> None:
        for req in reqs:
            if req.result is None:
                self.engine.abort(req)

    def stats(self) -> dict:
        sched = self.engine.scheduler
        return {"running": len(sched.running), "waiting": sum(not r.aborted for r in list(sched.waiting))}


# ---------------------------------------------------------------------------- request building
class Builder:
    """Validated request -> engine requests (runs in a worker thread: media I/O, tokenizing)."""

    def __init__(self, llm):
        self.llm = llm

    def params(self, greq: GenerationRequest, index: int):
        kw = dict(greq.sampling)
        if greq.n > 1 and kw.get("seed") is not None:
            kw["seed"] += index  # otherwise every choice would be the same draw
        try:
            return self.llm.sampling_params(**kw)
        except (TypeError, ValueError) as e:
            # "SamplingParams.top_p must be in (0, 1], got 0" -> param "top_p", in the user's words
            msg = str(e)
            if not msg.startswith("SamplingParams."):
                raise ProtocolError(msg) from None
            field = msg.split(" ", 1)[0].removeprefix("SamplingParams.")
            name = _PARAM_NAMES.get(field, field)
            raise ProtocolError(msg.replace(f"SamplingParams.{field}", name), name) from None

    def chat(self, greq: GenerationRequest) -> list[Request]:
        first = self.llm.request(greq.messages, self.params(greq, 0), greq.mm_processor_kwargs,
                                 **greq.template_kwargs)
        return self._copies(first, greq)

    def completion(self, greq: GenerationRequest) -> list[Request]:
        reqs = []
        for prompt in greq.prompts:
            inputs = self.llm.processor(text=prompt, return_tensors="pt")
            inputs = {"input_ids": inputs["input_ids"]}
            reqs += self._copies(self.llm.engine.make_request(inputs, self.params(greq, 0)), greq)
        return reqs

    def _copies(self, first: Request, greq: GenerationRequest) -> list[Request]:
        """n choices share the processed prompt; each gets its own request (and seed)."""
        self._check_room(first, greq)
        reqs = [first]
        for i in range(1, greq.n):
            copy = self.llm.engine.make_request(dict(first.inputs), self.params(greq, i))
            copy.shares_prompt = True  # usage counts a prompt once, however many choices it has
            reqs.append(copy)
        return reqs

    def _check_room(self, req: Request, greq: GenerationRequest) -> None:
        limit = self.llm.engine.max_model_len
        if greq.max_tokens is not None and req.prompt_len + greq.max_tokens > limit:
            raise ProtocolError(f"this model's maximum context length is {limit} tokens; the request has "
                                f"{req.prompt_len} prompt tokens and asks for {greq.max_tokens} more",
                                "max_tokens", code="context_length_exceeded")


# ---------------------------------------------------------------------------- serving
class Server:
    """The endpoints' logic, shared by chat and completions."""

    def __init__(self, llm, model_name: str, aliases: set[str], policy: MediaPolicy):
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
            if isinstance(e, ProtocolError):
                raise
            raise _as_protocol_error(e) from None
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
                    return _error(499, "client closed the request")
        finally:
            watcher.cancel()
            self.bridge.abort(reqs)
        failed = next((r.error for r in reqs if r.error is not None), None)
        if failed is not None:
            return _engine_error(failed)
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
                        yield f"data: {json.dumps(_engine_error_body(reqs[i].error))}\n\n"
                        break
                    yield chunk([piece(i, None, delta.result.finish_reason)])
            if include_usage:
                yield chunk([], usage_body(_distinct_usages(reqs)))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self.bridge.abort(reqs)  # client gone or stream cut: free the slots now


def _distinct_usages(reqs: list[Request]) -> list:
    """Usages with the prompt of n copies counted once (as OpenAI counts it)."""
    out = []
    for r in reqs:
        u = r.result.usage if r.result is not None else r.usage
        out.append(type(u)(0 if getattr(r, "shares_prompt", False) else u.prompt_tokens, u.completion_tokens))
    return out


def _as_protocol_error(e: Exception) -> ProtocolError:
    """A processing failure (bad media, template, prompt too long) as a 400 naming the field."""
    too_long = "maximum model length" in str(e)
    param = "messages" if too_long or isinstance(e, MediaError) else None
    return ProtocolError(str(e), param, code="context_length_exceeded" if too_long else None)


def _engine_error_body(e: Exception) -> dict:
    if isinstance(e, ValueError):
        return error_body(str(e))
    # Unexpected: the details go to the server log, the client gets a plain message.
    print("[qwen3vl serve] engine error:", file=sys.stderr)
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    return error_body("the engine failed while generating this request", "server_error")


def _engine_error(e: Exception) -> JSONResponse:
    return JSONResponse(_engine_error_body(e), status_code=400 if isinstance(e, ValueError) else 500)


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
def create_app(llm, model_name: str, api_key: str | None = None, allowed_local_media_path: str | None = None,
               aliases: set[str] | None = None) -> FastAPI:
    """The FastAPI app over a loaded ``LLM`` (whose engine thread the caller starts)."""
    app = FastAPI(title="qwen3vl", docs_url=None, redoc_url=None, openapi_url=None)
    server = Server(llm, model_name, set(aliases or ()), MediaPolicy(allowed_local_media_path))
    app.state.server = server
    authorize = _authorizer(api_key)
    _install_error_handlers(app)
    page = open(os.path.join(STATIC, "chat.html"), encoding="utf-8").read()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "demo": llm.is_demo, **server.bridge.stats(),
                "max_num_seqs": len(llm.engine.scheduler.slots), "max_model_len": llm.engine.max_model_len}

    @app.get("/v1/models")
    async def models(http: HTTPRequest):
        authorize(http)
        card = {"id": model_name, "object": "model", "created": int(START_TIME), "owned_by": "qwen3vl",
                "max_model_len": llm.engine.max_model_len}
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


START_TIME = time.time()


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


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProtocolError)
    async def protocol_error(request, exc: ProtocolError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _error(404, f"unknown request URL: {request.method} {request.url.path}", code="not_found")
        if exc.status_code == 405:
            return _error(405, f"method {request.method} is not allowed on {request.url.path}")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        # Starlette re-raises it afterwards, so the traceback reaches the server log, never the client.
        return _error(500, "internal server error", "server_error")


# ---------------------------------------------------------------------------- qwen3vl serve
def _model_name(args, llm) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        return "qwen3vl-demo"
    return os.path.basename(os.path.normpath(args.model)) if os.path.isdir(args.model) else args.model


def _bind(host: str, port: int) -> socket.socket:
    """Bind before serving so that a busy port is a clear error and the printed URL is live."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _serve_http_in_thread(app, sock: socket.socket, stopping: threading.Event) -> tuple:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:  # the HTTP side died on its own: wake the main thread out of the engine loop
            if not stopping.is_set():
                os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=run, name="qwen3vl-http", daemon=True)
    thread.start()
    return server, thread


def _run_engine(engine) -> None:
    """Step the engine on THIS (the main) thread until interrupted.

    Why not ``Engine.start()``'s background thread: on CPU, stepping from a thread other than the one
    that first ran PyTorch ops (here the main thread, which loaded the model) measured ~2x slower per
    decode step (OpenMP thread pools are per calling thread). So HTTP gets the extra thread instead.
    """
    engine.run_forever()


def serve(args) -> int:
    from ..demo import DEMO_NOTICE
    from ..engine.llm import LLM

    print(f"[qwen3vl serve] loading {args.model or 'the tiny demo checkpoint'} ...", file=sys.stderr, flush=True)
    extra = {"quantization": args.quantization, "group_size": args.group_size}
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, **extra)
    if llm.is_demo:
        print(f"[qwen3vl demo] {DEMO_NOTICE}", file=sys.stderr, flush=True)
    name = _model_name(args, llm)
    aliases = {args.model} if args.model else set()
    app = create_app(llm, name, args.api_key, args.allowed_local_media_path, aliases)
    sock = _bind(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}"
    print(f"[qwen3vl serve] serving '{name}' at {url}/ (web chat) and {url}/v1 (OpenAI API); "
          f"max_num_seqs={args.max_num_seqs} max_model_len={llm.engine.max_model_len}", file=sys.stderr, flush=True)
    # SIGTERM stops the server like Ctrl-C does (the engine loop runs on this thread).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stopping = threading.Event()
    server, thread = _serve_http_in_thread(app, sock, stopping)
    try:
        _run_engine(llm.engine)
    except KeyboardInterrupt:
        pass
    finally:
        stopping.set()
        server.should_exit = True
        thread.join(5)
    print("[qwen3vl serve] stopped", file=sys.stderr, flush=True)
    return 0
