"""Between HTTP handlers and the engine: validated requests -> engine requests (``Builder``, run
in worker threads) and engine deltas -> asyncio queues (``EngineBridge``). Only the engine's
public API is used: ``LLM.request`` / ``LLM.prompt_request`` / ``LLM.sampling_params``,
``Engine.new_request`` / ``submit`` / ``cancel`` / ``stats`` / ``max_model_len``.
"""
from __future__ import annotations

import asyncio

from ..engine.api import LLM, Delta, EngineStats, Request, SamplingParams
from .errors import ProtocolError
from .memory import release_free_memory
from .protocol import GenerationRequest


class EngineBridge:
    """Submits requests to the engine's stepping thread and delivers their deltas to asyncio queues."""

    def __init__(self, llm: LLM):
        self.engine = llm.engine

    def submit(self, reqs: list[Request], final_only: bool = False) -> asyncio.Queue:
        """Start ``reqs``; the queue receives ``(choice index, Delta)`` from the engine thread
        (only the last Delta of each with ``final_only``: no event-loop wake-up per token)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        media = any(r.usage.image_tokens or r.usage.video_tokens for r in reqs)

        def listener(delta: Delta, index: int) -> None:
            if media and delta.finished:
                release_free_memory()  # the pixels and activations are gone: give their pages back
            if final_only and not delta.finished:
                return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, delta))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        for i, req in enumerate(reqs):
            self.engine.submit(req, lambda d, i=i: listener(d, i))
        return queue

    def cancel(self, reqs: list[Request]) -> None:
        for req in reqs:
            if req.result is None:
                self.engine.cancel(req)

    def stats(self) -> EngineStats:
        return self.engine.stats()


class Builder:
    """Validated request -> engine requests, one per choice (runs in a worker thread: media I/O,
    tokenizing). Raises the engine's / processor's typed errors on bad input."""

    def __init__(self, llm: LLM):
        self.llm = llm

    def params(self, greq: GenerationRequest, index: int) -> SamplingParams:
        kw = dict(greq.sampling)
        if greq.n > 1 and kw.get("seed") is not None:
            kw["seed"] += index  # otherwise every choice would be the same draw
        return self.llm.sampling_params(**kw)

    def chat(self, greq: GenerationRequest) -> list[Request]:
        first = self.llm.request(greq.messages, self.params(greq, 0), greq.mm_processor_kwargs,
                                 **greq.constraint_kwargs, **greq.template_kwargs)
        return self._choices(first, greq)

    def completion(self, greq: GenerationRequest) -> list[Request]:
        reqs = []
        for prompt in greq.prompts:
            reqs += self._choices(self.llm.prompt_request(prompt, self.params(greq, 0)), greq)
        return reqs

    def _choices(self, first: Request, greq: GenerationRequest) -> list[Request]:
        """n choices share the processed prompt; each gets its own request (and seed)."""
        self._check_room(first, greq)
        engine = self.llm.engine
        return [first] + [engine.new_request(first.inputs, self.params(greq, i), first.metadata, shares_prompt=True,
                                             output=first.output_format, constraint=first.constraint)
                          for i in range(1, greq.n)]

    def _check_room(self, req: Request, greq: GenerationRequest) -> None:
        limit = self.llm.engine.max_model_len
        if greq.max_tokens is not None and req.prompt_len + greq.max_tokens > limit:
            raise ProtocolError(f"this model's maximum context length is {limit} tokens; the request has "
                                f"{req.prompt_len} prompt tokens and asks for {greq.max_tokens} more",
                                "max_tokens", code="context_length_exceeded")
