"""Bounded worker pools for request building (templating, tokenizing, media download and decoding).

Requests with media and text-only requests get a pool each, so that slow downloads fill only
the media pool while text requests (and ``/health``, which never leaves the event loop) go on.
A pool holds at most ``workers + backlog`` requests; past that it refuses at once (503) rather
than queueing work no client may still wait for. Threads are daemons: a download that is still
running never holds up the server's exit.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

from .errors import ProtocolError

T = TypeVar("T")


class BoundedPool:
    def __init__(self, name: str, workers: int, backlog: int):
        self.name, self.limit = name, workers + backlog
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        for i in range(workers):
            threading.Thread(target=self._work, name=f"qwen3vl-{name}-{i}", daemon=True).start()

    @property
    def pending(self) -> int:
        """Requests running or waiting in this pool."""
        return self._pending

    async def run(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on a worker; raises a 503 ``ProtocolError`` when the pool is full."""
        with self._lock:
            if self._pending >= self.limit:
                raise ProtocolError(f"the server is busy: {self._pending} {self.name} requests are already being "
                                    "prepared; retry shortly", status=503, type="server_error", code="server_busy")
            self._pending += 1
        future: Future = Future()
        self._jobs.put((fn, args, future))
        return await asyncio.wrap_future(future)

    def _work(self) -> None:
        while True:
            fn, args, future = self._jobs.get()
            result = error = None
            running = future.set_running_or_notify_cancel()
            if running:
                try:
                    result = fn(*args)
                except BaseException as e:  # handed to the awaiting handler, which maps or logs it
                    error = e
            # The slot frees before the result is handed over: whoever awaits it sees the pool as
            # it is after this job.
            with self._lock:
                self._pending -= 1
            if running:
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
            del fn, args, future, result, error  # an idle worker must not keep a request's body or result alive
