"""The serving engine: requests in, token deltas out, with continuous batching.

``Engine.step()`` admits at most one waiting request (its prefill), then decodes one token for
every running request in a single batched forward pass. The sampling state of the decode batch
is rebuilt only when its membership changes. ``Engine`` is used synchronously by ``LLM`` and from
a background thread by the HTTP server (``start``/``submit``).
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from .request import Delta, Request
from .runner import Runner
from .sampling import Sampler, SamplingParams, SamplingState
from .scheduler import Scheduler


class Engine:
    def __init__(self, model, processor, max_num_seqs: int = 8, max_model_len: int | None = None):
        self.model, self.processor = model, processor
        self.max_model_len = max_model_len or min(model.config.text.max_position_embeddings, 8192)
        self.runner = Runner(model, max_num_seqs, self.max_model_len)
        self.scheduler = Scheduler(max_num_seqs)
        self.sampler = Sampler()
        self.vocab = model.config.text.vocab_size
        self._rows: list[Request] = []  # decode batch membership, in slot order
        self._state: SamplingState | None = None
        self._lock = threading.Condition()
        self._listeners: dict[int, Callable[[Delta], None]] = {}
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ requests
    def make_request(self, inputs: dict, params: SamplingParams, metadata: dict | None = None) -> Request:
        t = inputs["input_ids"].shape[1]
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("one request holds one prompt")
        if t + 1 > self.max_model_len:
            raise ValueError(f"prompt has {t} tokens; the maximum model length is {self.max_model_len}")
        # Never generate past the cache: shorten the budget to what fits.
        room = self.max_model_len - t
        if params.max_new_tokens > room:
            params = SamplingParams(**{**params.__dict__, "max_new_tokens": room,
                                       "min_new_tokens": min(params.min_new_tokens, room)})
        p = self.processor
        return Request(inputs, params, p.tokenizer, p.image_token_id, p.video_token_id, metadata)

    def add(self, req: Request, listener: Callable[[Delta], None] | None = None) -> Request:
        with self._lock:
            if listener is not None:
                self._listeners[req.id] = listener
            self.scheduler.add(req)
            self._lock.notify()
        return req

    def abort(self, req: Request) -> None:
        """Stop a request now (e.g. its client went away); its slot is freed at the next step."""
        with self._lock:
            req.aborted = True
            self._lock.notify()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[tuple[Request, Delta]]:
        out: list[tuple[Request, Delta]] = []
        with self._lock:
            for req in [r for r in self.scheduler.running if r.aborted]:
                out.append((req, req.abort()))
                self.scheduler.release(req)
            for req in self.scheduler.drop_aborted_waiting():
                out.append((req, req.abort()))
            new = self.scheduler.admit()
        if new is not None:
            try:
                out.append((new, self._prefill(new)))
            except Exception as e:  # a bad prompt fails alone; LLM re-raises it to the caller
                self.scheduler.release(new)
                new.error = e
                out.append((new, new.abort()))
        if self.scheduler.running:
            out += self._decode()
        for req, delta in out:
            listener = self._listeners.get(req.id)
            if listener is not None:
                listener(delta)
                if delta.finished:
                    self._listeners.pop(req.id, None)
        return out

    def _finish_if_done(self, req: Request, delta: Delta) -> Delta:
        if delta.finished:
            self.scheduler.release(req)
        return delta

    def _prefill(self, req: Request) -> Delta:
        logits, req.next_position = self.runner.prefill(req.slot, req.inputs)
        req.cache_len = req.prompt_len
        req.inputs = None  # pixel values are not needed any more
        req.state = SamplingState.new([req.params], [req.prompt_ids], self.vocab, logits.device)
        token = int(self.sampler(logits[None], req.state)[0])
        return self._finish_if_done(req, req.add_token(token))

    def _batch_state(self, running: list[Request]) -> SamplingState:
        """The sampling state of the decode batch, rebuilt only when its membership changes."""
        if running != self._rows:
            old = {r.id: i for i, r in enumerate(self._rows)}
            kept = [r for r in running if r.id in old]
            joined = [r for r in running if r.id not in old]
            parts = ([self._state.select([old[r.id] for r in kept])] if kept else []) + [r.state for r in joined]
            state = SamplingState.concat(parts)
            order = kept + joined
            perm = [order.index(r) for r in running]  # rows must follow slot order
            self._state = state if perm == list(range(len(perm))) else state.select(perm)
            self._rows = list(running)
        return self._state

    def _decode(self) -> list[tuple[Request, Delta]]:
        running = sorted(self.scheduler.running, key=lambda r: r.slot)
        width = self.scheduler.decode_width()
        tokens = torch.zeros(width, dtype=torch.long)
        positions = torch.zeros(width, dtype=torch.long)
        cache_pos = torch.zeros(width, dtype=torch.long)
        for r in running:
            tokens[r.slot] = r.output_ids[-1]
            positions[r.slot] = r.next_position
            cache_pos[r.slot] = r.cache_len
        logits = self.runner.decode(tokens, positions, cache_pos, int(cache_pos.max()) + 1)  # (width, V)
        rows = torch.tensor([r.slot for r in running], device=logits.device)
        next_ids = self.sampler(logits[rows], self._batch_state(running)).tolist()
        out = []
        for r, tok in zip(running, next_ids):
            r.cache_len += 1
            r.next_position += 1
            out.append((r, self._finish_if_done(r, r.add_token(tok))))
        return out

    def run_until_done(self, requests: list[Request]) -> None:
        while any(r.result is None for r in requests):
            self.step()

    # ------------------------------------------------------------------ background loop (server)
    def start(self) -> None:
        """Run steps in a daemon thread whenever there is work."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.run_forever, name="qwen3vl-engine", daemon=True)
            self._thread.start()

    def run_forever(self) -> None:
        """Step whenever there is work, on the calling thread, until the process ends. (Stepping
        on the thread that loaded the model is measurably faster than on another one.)"""
        while True:
            with self._lock:
                while not self.scheduler.has_work():
                    self._lock.wait()
            try:
                self.step()
            except Exception as e:  # a failing request must not kill the engine
                self._fail_running(e)

    def _fail_running(self, error: Exception) -> None:
        for req in self.scheduler.running + list(self.scheduler.waiting):
            req.error = error
            delta = req.abort()
            self.scheduler.release(req)
            self.scheduler.remove_waiting(req)
            listener = self._listeners.pop(req.id, None)
            if listener is not None:
                listener(delta)
        self._rows, self._state = [], None
