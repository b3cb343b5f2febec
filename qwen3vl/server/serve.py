"""``qwen3vl serve``: load the model, bind the port, run HTTP in a thread and the engine here.

The engine steps on the main thread (the one that loaded the model): on CPU, stepping from a
thread other than the one that first ran PyTorch ops measured ~2x slower per decode step (OpenMP
thread pools are per calling thread), so uvicorn gets the extra thread instead.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading

import uvicorn

from ..demo import DEMO_NOTICE
from ..engine.api import LLM
from .app import create_app
from .limits import fit_video_budget
from .settings import ServeSettings


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def _stop_on_rank_failure(message: str) -> None:
    """A tensor-parallel rank died: say so and stop the server (SIGTERM ends the engine loop)."""
    _log(f"[qwen3vl serve] {message}; shutting down")
    os.kill(os.getpid(), signal.SIGTERM)


def load(settings: ServeSettings) -> LLM:
    _log(f"[qwen3vl serve] loading {settings.model or 'the tiny demo checkpoint'} ...")
    llm = LLM(settings.model, dtype=settings.dtype, device=settings.device, max_num_seqs=settings.max_num_seqs,
              max_model_len=settings.max_model_len, quantization=settings.quantization,
              group_size=settings.group_size, media_limits=settings.media_limits(),
              prefix_cache_gb=settings.prefix_cache_gb, enable_prefix_caching=settings.enable_prefix_caching,
              max_num_batched_tokens=settings.max_num_batched_tokens, rope_scaling=settings.rope_scaling,
              tensor_parallel_size=settings.tensor_parallel_size, enable_expert_parallel=settings.enable_expert_parallel,
              on_rank_failure=_stop_on_rank_failure)
    budget = fit_video_budget(llm.processor.video_processor, llm.engine.max_model_len)
    if budget is not None:
        _log(f"[qwen3vl serve] a video is resized to at most {budget:,} pixels (t x h x w: a quarter of the context)")
    if llm.is_demo:
        _log(f"[qwen3vl demo] {DEMO_NOTICE}")
    return llm


def serve(settings: ServeSettings) -> int:
    """Serve until Ctrl-C or SIGTERM; returns the exit status."""
    llm = load(settings)
    app = create_app(llm, settings)
    sock = _bind(settings.host, settings.port)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{host}:{sock.getsockname()[1]}"
    engine = llm.engine
    _log(f"[qwen3vl serve] serving '{settings.model_name}' at {url}/ (web chat) and {url}/v1 (OpenAI API); "
         f"max_num_seqs={engine.max_num_seqs} max_model_len={engine.max_model_len}")
    hosts = settings.host_allow_list()
    _log(f"[qwen3vl serve] limits: body {settings.max_body_mb:g} MiB, {settings.max_images} images / "
         f"{settings.max_videos} videos per request, media workers {settings.media_workers}; Host header: "
         f"{'any' if hosts is None else ', '.join(sorted(hosts))}; CORS: "
         f"{', '.join(settings.allowed_origins) if settings.allowed_origins else 'off'}")
    # SIGTERM stops the server like Ctrl-C does (the engine loop runs on this thread).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stopping = threading.Event()
    server, thread = _serve_http_in_thread(app, sock, stopping)
    try:
        engine.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stopping.set()
        server.should_exit = True
        thread.join(5)
        llm.shutdown()  # tensor-parallel ranks, if any
    _log("[qwen3vl serve] stopped")
    return 0
