"""The serving engine: requests in, token deltas out, with continuous batching.

``Engine.step()`` admits at most one waiting request (or one prefill group, a padded batch
prefilled in one pass), runs a chunk of the admitted prompt's prefill (chunked prefill: while
other requests decode, a step prefills at most ``max_num_batched_tokens`` minus their number of
positions, so a long prompt such as a video never freezes running streams for more than one
chunk; alone, in pieces of up to 8,192 tokens), hands a finished prompt's first token to the
listeners at once, then decodes one token for every request past its prefill in a single
batched forward pass. The sampling state of the decode batch is rebuilt only when its
membership changes. ``Qwen3VL.generate`` runs on a
private engine too (``qwen3vl.engine.generate``): one loop and one stop implementation for both.

The narrow API that ``LLM`` and the HTTP server use: ``new_request`` (raises ``PromptTooLong``),
``submit`` (with an optional listener that receives every ``Delta``), ``cancel``, ``stats``,
``max_model_len`` / ``max_num_seqs``, and the loops ``step`` / ``run_until_done`` (synchronous,
``LLM``) and ``run_forever`` (the server's stepping thread). ``submit``, ``cancel`` and ``stats``
are safe to call from other threads while ``run_forever`` steps; with nothing to step, it moves the
model's memory-mapped weights into huge-page memory a piece at a time (``model.mapped``, see
``qwen3vl.model.promote``).

Prefix caching (on by default; prefill groups bypass it): a request reuses the longest run of
cached KV blocks its prompt starts with (``prefix_cache``) and prefills only the rest, at the
whole prompt's MRoPE positions; the media of that rest come from the vision encoder cache
(``encoder_cache``) when seen before, and media wholly inside the reused part are not encoded at
all. ``Usage.cached_tokens`` reports the reused tokens. Both caches are used on the stepping
thread only; a request's media are hashed in ``new_request``, on the caller's thread.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .constrained import Constraint, GrammarCache, advance, apply_masks
from .encoder_cache import EncoderCache, after_cut, media_items, owners, tail_media
from .errors import PromptTooLong
from .output_parser import OutputFormat
from .prefill import Admitted, PendingPrefill, chunk_size
from .prefix_cache import PrefixCache, SequenceKeys, block_keys
from .request import Delta, PrefillGroup, Request
from .runner import Runner
from .sampling import Sampler, SamplingState
from .sampling_params import SamplingParams, checkpoint_stop_ids
from .scheduler import Scheduler


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests holding a KV slot
    waiting: int  # requests queued for a slot


class Engine:
    def __init__(self, model, processor, max_num_seqs: int = 8, max_model_len: int | None = None,
                 cuda_graphs: bool | None = None, prefix_cache_gb: float = 2.0, enable_prefix_caching: bool = True,
                 encoder_cache_gb: float = 0.5, prefix_block_size: int = 16, max_num_batched_tokens: int = 512,
                 runner: Callable[[int, int], Runner] | None = None):
        """``processor`` None: requests carry token ids only (no text), media token ids from the
        model's config. ``prefix_cache_gb``: the KV blocks kept for reuse; ``encoder_cache_gb``:
        the vision features kept; ``enable_prefix_caching=False`` turns both caches off;
        ``max_num_batched_tokens``: the tokens one step runs while other requests decode (a longer
        prompt is prefilled in chunks between their decode steps); ``runner(max_num_seqs,
        max_model_len)``: builds the runner in place of the one-process ``Runner`` (tensor parallel)."""
        if max_num_batched_tokens < 16:
            raise ValueError(f"max_num_batched_tokens must be >= 16, got {max_num_batched_tokens}")
        self.model, self.processor = model, processor
        self.max_model_len = max_model_len or min(model.config.text.max_position_embeddings, 8192)
        self.runner = (runner(max_num_seqs, self.max_model_len) if runner is not None
                       else Runner(model, max_num_seqs, self.max_model_len, cuda_graphs))
        self.prefix = None
        if enable_prefix_caching:
            self.prefix = PrefixCache(model.config.text, int(prefix_cache_gb * 2**30), prefix_block_size,
                                      model.dtype, model.device)
        self.encoders = EncoderCache(int(encoder_cache_gb * 2**30) if enable_prefix_caching else 0)
        self.scheduler = Scheduler(max_num_seqs)
        self.sampler = Sampler()
        self.vocab = model.config.text.vocab_size
        # The checkpoint's end-of-sequence ids, for requests that leave stop_token_ids unset.
        self.tokenizer = None if processor is None else processor.tokenizer
        self.stop_token_ids = checkpoint_stop_ids(model.generation_config.get("eos_token_id"),
                                                  model.config.text.eos_token_id,
                                                  None if processor is None else processor.tokenizer.eos_token_id)
        self.grammars = None if processor is None else GrammarCache(processor.tokenizer, self.vocab,
                                                                     self.stop_token_ids)
        ids = processor if processor is not None else model.config
        self.media_token_ids = (ids.image_token_id, ids.video_token_id)
        self.max_num_batched_tokens = max_num_batched_tokens
        self._filling: Admitted | None = None  # the admitted prompt being prefilled in chunks
        self._rows: list[Request] = []  # decode batch membership, in slot order
        self._state: SamplingState | None = None
        self._lock = threading.Condition()
        self._listeners: dict[int, Callable[[Delta], None]] = {}
        # generate(output_scores=True): called with (requests, raw logits, processed scores) before each sampling.
        self.on_logits: Callable | None = None

    @property
    def max_num_seqs(self) -> int:
        return len(self.scheduler.slots)

    # ------------------------------------------------------------------ requests
    def new_request(self, inputs: dict, params: SamplingParams, metadata: dict | None = None,
                    shares_prompt: bool = False, output: OutputFormat | None = None,
                    constraint: Constraint | None = None) -> Request:
        """One processed prompt (``input_ids`` (1, T) and its media tensors) -> a request to ``submit``.

        Unset stop token ids become the checkpoint's; a budget past ``max_model_len`` is shortened
        to what fits. Raises ``PromptTooLong`` when not even one token fits. ``output``: split the
        text into reasoning / answer / tool calls (``Delta`` and ``ChatResult`` fields);
        ``constraint``: grammar-constrained output (raises ``ConstraintError`` if it cannot compile).
        """
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("one request holds one prompt")
        params = self._fit(params, inputs["input_ids"].shape[1])
        req = Request(inputs, params, self.tokenizer, *self.media_token_ids, metadata, shares_prompt,
                      output=output)
        mask = inputs.get("attention_mask")
        if mask is None or bool(mask.all()):
            req.media = media_items(inputs, self.model.config.vision.spatial_merge_size, self.prefix is not None)
        req.constraint = constraint
        if constraint is not None:
            if self.grammars is None:
                raise ValueError("constrained output needs the engine's processor (its tokenizer)")
            req.matcher = self.grammars.matcher(constraint)
        return req

    def new_group(self, inputs: dict, params: list[SamplingParams]) -> list[Request]:
        """A batch of B prompts (``input_ids`` (B, T), left-padded where ``attention_mask`` says so,
        media tensors) -> B requests (``params[i]`` for row i) that are prefilled together into B
        consecutive slots and then decode in lock-step; ``submit`` each."""
        ids = inputs["input_ids"]
        b, t = ids.shape
        if len(params) != b:
            raise ValueError(f"{len(params)} SamplingParams for a batch of {b}")
        mask = inputs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device, torch.bool)
        group = PrefillGroup(inputs)
        return [Request({"input_ids": ids[i][valid[i]][None]}, self._fit(p, t), self.tokenizer,
                        *self.media_token_ids, group=group) for i, p in enumerate(params)]

    def _fit(self, params: SamplingParams, t: int) -> SamplingParams:
        """``params`` for a prompt taking t cache positions: the checkpoint's stop ids where unset,
        the budget cut to what fits in ``max_model_len``."""
        if t + 1 > self.max_model_len:
            raise PromptTooLong(t, self.max_model_len)
        params = params.with_default_stops(self.stop_token_ids)
        room = self.max_model_len - t  # never generate past the cache
        if params.max_new_tokens > room:
            params = replace(params, max_new_tokens=room, min_new_tokens=min(params.min_new_tokens, room))
        return params

    def submit(self, req: Request, listener: Callable[[Delta], None] | None = None) -> Request:
        """Queue ``req``; ``listener`` (called on the stepping thread) gets each of its deltas."""
        with self._lock:
            if listener is not None:
                self._listeners[req.id] = listener
            self.scheduler.add(req)
            self._lock.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request now (e.g. its client went away); its slot is freed at the next step, which
        also delivers its final (``abort``) delta."""
        with self._lock:
            req.aborted = True
            self._lock.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(len(self.scheduler.running), self.scheduler.num_waiting())

    # ------------------------------------------------------------------ stepping
    @torch.inference_mode()
    def step(self) -> list[tuple[Request, Delta]]:
        """Cancelled requests end, at most one admission is prefilled, every running request decodes
        one token. -> every (request, delta) of the step, each already handed to its listener.
        (Inference mode throughout: the sampler updates the step's logits and its state in place.)"""
        with self._lock:
            out = [(req, req.abort()) for req in self.scheduler.running if req.aborted]
            for req, _ in out:
                self._store(req)
                self.scheduler.release(req)
            out += [(req, req.abort()) for req in self.scheduler.drop_aborted_waiting()]
            if self._filling is not None and self._filling.req.aborted:
                self._filling = None
            new = self.scheduler.admit() if self._filling is None else []
        if new:
            out += self._prefill_group(new) if new[0].group is not None else self._begin(new[0])
        if self._filling is not None:
            out += self._prefill_chunk(len(self._decoders()))
        self._deliver(out)  # a new request's first token goes out before the decode step runs
        if self._decoders():
            decoded = self._decode()
            self._deliver(decoded)
            out += decoded
        return out

    def _decoders(self) -> list[Request]:
        """The running requests past their prefill, in slot order."""
        filling = None if self._filling is None else self._filling.req
        return sorted((r for r in self.scheduler.running if r is not filling), key=lambda r: r.slot)

    def _deliver(self, pairs: list[tuple[Request, Delta]]) -> None:
        for req, delta in pairs:
            listener = self._listeners.get(req.id)
            if listener is not None:
                listener(delta)
                if delta.finished:
                    self._listeners.pop(req.id, None)

    def _finish_if_done(self, req: Request, delta: Delta) -> Delta:
        if delta.finished:
            self._store(req)
            self.scheduler.release(req)
        return delta

    def _prefill_group(self, reqs: list[Request]) -> list[tuple[Request, Delta]]:
        """Prefill a group in one padded pass and sample each one's first token. A bad prompt
        fails alone (its requests end with ``error`` set; ``LLM`` re-raises it)."""
        inputs = reqs[0].group.inputs
        try:
            logits, next_position = self.runner.prefill_rows(reqs[0].slot, inputs)  # (B, V), (B,)
        except Exception as e:
            return self._fail(reqs, e)
        reqs[0].group.inputs = None
        return [(req, self._first_token(req, logits[i : i + 1], int(next_position[i]), inputs["input_ids"].shape[1]))
                for i, req in enumerate(reqs)]

    def _fail(self, reqs: list[Request], error: Exception) -> list[tuple[Request, Delta]]:
        for req in reqs:
            self.scheduler.release(req)
            req.error = error
        return [(req, req.abort()) for req in reqs]

    def _first_token(self, req: Request, logits: torch.Tensor, next_position: int, cache_len: int) -> Delta:
        """A prefilled request's first token from its last-position logits (1, V)."""
        req.cache_len = cache_len  # padded rows hold their padding too
        req.next_position = next_position
        req.inputs = req.media = None  # pixel values are not needed any more
        req.state = SamplingState.new([req.params], [req.prompt_ids], self.vocab, logits.device)
        apply_masks(logits, [req.live_matcher])
        if self.on_logits is not None:
            self.on_logits([req], logits, self.sampler.process_logits(logits, req.state))
        token = int(self.sampler(logits, req.state)[0])
        advance([req.live_matcher], [token])
        return self._finish_if_done(req, req.add_token(token))

    def _begin(self, req: Request) -> list[tuple[Request, Delta]]:
        """Admit one request: the next steps encode its media and prefill its prompt in chunks."""
        self._filling = Admitted(req)
        self._filling.prep = self._prepare(self._filling)
        return []

    def _prepare(self, f: Admitted):
        """Generator: reuse the longest cached prefix of the prompt (never its last token, whose
        logits are needed), encode the media of the rest in pieces (yielding after each) and embed
        it -> the ``PendingPrefill`` of the rest, at the whole prompt's MRoPE positions."""
        req, slot = f.req, f.req.slot
        ids, inputs = req.prompt_ids.cpu(), req.inputs  # ids (T,)
        own = None if req.media is None else owners(ids, req.media, *self.media_token_ids)
        if own is None:  # padded, or placeholders and media disagree (prepare reports it)
            prompt = self.model.prepare(**inputs)
            self.runner.cache.reset(slot)
            return PendingPrefill(req, 0, prompt.embeds, prompt.positions, prompt.visual_mask, prompt.deepstack,
                                  prompt.next_position)
        positions, next_position = self.model.positions(ids[None], None, inputs.get("image_grid_thw"),
                                                        inputs.get("video_grid_thw"))  # (3, 1, T), (1,)
        seq = None
        if self.prefix is not None:
            media = [it.key for it in req.media]
            keys = block_keys(ids, positions[:, 0], own, media, self.prefix.block)
            f.start = self.prefix.load(self.runner.cache, slot, self.prefix.match(keys[: (len(ids) - 1) // self.prefix.block]))
            seq = SequenceKeys(positions[:, 0], own, media, keys, int(next_position[0]))
        self.runner.cache.reset(slot, f.start)
        before = tuple(int((ids[: f.start] == tok).sum()) for tok in self.media_token_ids)
        known = {}
        budget = lambda: chunk_size(self.max_num_batched_tokens, f.decoding, 1 << 62)  # noqa: E731
        yield from self.encoders.encode_pieces(self.model, after_cut(req.media, before)[0], budget, known)
        image, video = tail_media(self.model, self.encoders, req.media, before, known)
        embeds, visual_mask, deepstack = self.model.embed(ids[None, f.start :], image, video)  # (1, T - start, H)
        req.usage.cached_tokens = f.start
        return PendingPrefill(req, f.start, embeds, positions[:, :, f.start :], visual_mask, deepstack,
                              next_position, seq)

    def _prefill_chunk(self, decoding: int) -> list[tuple[Request, Delta]]:
        """The admitted prompt's next encoder piece or prefill chunk; after its last chunk, store
        its blocks in the prefix cache (other choices of the prompt hit at once) and sample its
        first token."""
        f = self._filling
        req, f.decoding = f.req, decoding
        try:
            if not f.prepared():
                return []
            p = f.pending
            c = p.take(chunk_size(self.max_num_batched_tokens, decoding, p.remaining))
            logits = self.runner.prefill_tail(req.slot, c.start, c.embeds, c.positions, c.visual_mask, c.deepstack)
        except Exception as e:
            self._filling = None
            return self._fail([req], e)
        if p.remaining:
            return []
        self._filling = None
        if p.keys is not None:
            req.keys = p.keys
            self.prefix.save(self.runner.cache, req.slot, p.keys.keys)
        return [(req, self._first_token(req, logits, int(p.next_position[0]), req.prompt_len))]

    def _store(self, req: Request) -> None:
        """Keep a finished request's blocks (prompt + answer: the next turn of a chat starts with
        them), from its slot before the slot is reused."""
        if req.keys is not None and req.error is None and req.slot is not None:
            generated = req.output_ids[: req.cache_len - req.prompt_len]
            keys = req.keys.extended(req.prompt_ids, generated, self.prefix.block, self.media_token_ids)
            self.prefix.save(self.runner.cache, req.slot, keys)
            req.keys = None

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
        running = self._decoders()
        slots = [r.slot for r in running]
        # Per slot: last token, its MRoPE position, its cache index; other slots below the highest
        # decoding one decode a dummy token: free ones at (0, 0, 0), one still being prefilled at
        # the index its next chunk overwrites.
        rows = torch.tensor([[r.output_ids[-1] for r in running], [r.next_position for r in running],
                             [r.cache_len for r in running]])  # (3, B)
        dense = slots == list(range(len(slots)))
        end = max(r.cache_len for r in running) + 1
        if not dense:
            cols = torch.zeros(3, slots[-1] + 1, dtype=torch.long)
            cols[:, slots] = rows
            rows = cols
            filling = self._filling
            if filling is not None and filling.req.slot <= slots[-1]:
                cols[2, filling.req.slot] = filling.pos
                end = max(end, filling.pos + 1)
        logits = self.runner.decode(rows[0], rows[1], rows[2], end)  # (width, V), ours to overwrite
        if not dense:
            logits = logits[torch.tensor(slots, device=logits.device)]
        matchers = [r.live_matcher for r in running]
        apply_masks(logits, matchers)
        if self.on_logits is not None:
            self.on_logits(running, logits, self.sampler.process_logits(logits, self._batch_state(running)))
        next_ids = self.sampler(logits, self._batch_state(running), scratch=True).tolist()
        advance(matchers, next_ids)
        out = []
        for r, tok in zip(running, next_ids):
            r.cache_len += 1
            r.next_position += 1
            out.append((r, self._finish_if_done(r, r.add_token(tok))))
        return out

    def run_until_done(self, requests: list[Request]) -> None:
        while any(r.result is None for r in requests):
            self.step()

    # ------------------------------------------------------------------ the server's loop
    def run_forever(self) -> None:
        """Step whenever there is work, on the calling thread, until the process ends. (Stepping
        on the thread that loaded the model is measurably faster than on another one.)"""
        mapped = getattr(self.model, "mapped", None)  # weight_cache.load's Promoter: idle time moves weights
        while True:
            with self._lock:
                idle = not self.scheduler.has_work()
                while idle and not (mapped is not None and mapped.pending()):
                    self._lock.wait()
                    idle = not self.scheduler.has_work()
            if idle:  # into huge-page memory (model/promote.py), one piece between checks for work
                mapped.idle_step()
                continue
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
        self._rows, self._state, self._filling = [], None, None
