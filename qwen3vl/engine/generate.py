"""Lock-step generation for one batch (what ``Qwen3VL.generate`` runs), on the serving engine's
loop: the rows are one prefill group of a private ``Engine`` sized for the batch (prefilled
together, then decoded one token per step), with the engine's sampler and stop handling; each row
stops on its own and its later positions are filled with the pad id.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .engine import Engine
from .request import Delta
from .sampling_params import SamplingParams

# Keys of a processor batch that the model consumes; others (e.g. mm_token_type_ids) are ignored.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class Step:
    tokens: torch.Tensor  # (B,) long, pad id for rows already finished
    finished: torch.Tensor  # (B,) bool, finished at or before this step
    stopped: torch.Tensor  # (B,) bool, this row produced a stop id at this step


def resolve_params(model, params: SamplingParams | None, config: dict | None = None, **overrides) -> SamplingParams:
    """Defaults from ``config`` (default: the checkpoint's generation_config.json), then per-call overrides."""
    if params is not None:
        if overrides:
            raise TypeError("pass either a SamplingParams or keyword settings, not both")
        return params
    if "eos_token_id" in overrides:
        overrides["stop_token_ids"] = overrides.pop("eos_token_id")
    return SamplingParams.from_generation_config(model.generation_config if config is None else config, **overrides)


def pad_id(model) -> int:
    """The checkpoint's pad id: generation_config.json's pad_token_id, else its (first) eos id,
    else config.json's."""
    gen = model.generation_config
    pad = gen.get("pad_token_id")
    for fallback in (gen.get("eos_token_id"), model.config.text.pad_token_id, model.config.text.eos_token_id):
        if pad is None:
            pad = fallback  # explicit None checks: 0 is a valid id
    if isinstance(pad, list):
        pad = pad[0]
    if pad is None:
        raise ValueError("the checkpoint names no pad or eos token id (generation_config.json / config.json)")
    return int(pad)


class _Positions:
    """Collects the rows' tokens as the engine delivers them and emits one ``Step`` per generated
    position once every row has it (a finished row gives the pad id)."""

    def __init__(self, b: int, pad: int, on_step: Callable[[Step], None] | None):
        self.tokens: list[list[int]] = [[] for _ in range(b)]
        self.reasons: list[str | None] = [None] * b
        self.pad, self.on_step, self.emitted = pad, on_step, 0
        self.ready: list[Step] = []

    def add(self, row: int, delta: Delta) -> None:
        self.tokens[row] += delta.token_ids
        if delta.finished:
            self.reasons[row] = delta.result.finish_reason
        while all(len(t) > self.emitted or r is not None for t, r in zip(self.tokens, self.reasons)):
            if all(len(t) <= self.emitted for t in self.tokens):
                return  # every row finished
            self._emit()

    def _emit(self) -> None:
        k = self.emitted
        cols = [(t[k] if len(t) > k else self.pad,  # token
                 r is not None and len(t) <= k + 1,  # finished at or before k
                 r == "stop" and len(t) == k + 1)  # stopped at k
                for t, r in zip(self.tokens, self.reasons)]
        tokens, finished, stopped = torch.tensor(cols).t()  # (3, B)
        step = Step(tokens, finished.bool(), stopped.bool())
        self.emitted += 1
        self.ready.append(step)
        if self.on_step is not None:
            self.on_step(step)  # at delivery time: a streamer sees each token when it exists


def left_aligned(inputs: dict, pad: int) -> dict:
    """``inputs`` with every row's real tokens moved to the right end (right- or otherwise-padded
    batches become left-padded). Exact: positions come from the attention mask, and the prefill
    group assumes left padding."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return inputs
    ids = inputs["input_ids"]
    valid = mask.to(ids.device).bool()
    t = ids.shape[1]
    left = torch.arange(t, device=ids.device) >= (t - valid.sum(1))[:, None]  # (B, T)
    if torch.equal(valid, left):
        return inputs
    moved = torch.full_like(ids, pad)
    moved[left] = ids[valid]  # row by row, in order: each row keeps its count of real tokens
    return {**inputs, "input_ids": moved, "attention_mask": left.to(mask.dtype)}


@torch.inference_mode()
def stream_tokens(model, batch: dict, params: SamplingParams | list[SamplingParams],
                  on_step: Callable[[Step], None] | None = None, tokenizer=None, pad: int | None = None,
                  on_logits: Callable | None = None) -> Iterator[Step]:
    """Yield one ``Step`` per generated position until every row has stopped (``on_step`` also
    gets each Step, as soon as its tokens exist). ``tokenizer``: lets stop strings match;
    ``pad``: the id given to finished rows (default: the checkpoint's); ``on_logits``: the
    engine's scores hook (``Engine.on_logits``)."""
    pad = pad_id(model) if pad is None else pad
    inputs = left_aligned({k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}, pad)
    b, t = inputs["input_ids"].shape
    rows = params if isinstance(params, list) else [params] * b
    engine = Engine(model, None, max_num_seqs=b, max_model_len=t + max(p.max_new_tokens for p in rows),
                    cuda_graphs=False)
    engine.tokenizer = tokenizer
    positions = _Positions(b, pad, on_step)
    reqs = engine.new_group(inputs, rows)
    if on_logits is not None:
        engine.on_logits = on_logits(reqs)
    for i, req in enumerate(reqs):
        engine.submit(req, lambda delta, i=i: positions.add(i, delta))
    while any(r.result is None for r in reqs):
        engine.step()
        for r in reqs:
            if r.error is not None:
                raise r.error
        yield from positions.ready
        positions.ready.clear()


def generate(model, batch: dict, params: SamplingParams | list[SamplingParams], streamer=None, **options) -> torch.Tensor:
    """-> (B, T + new) ids: the prompt followed by the generated tokens (pad after a row's end).
    ``streamer``: an object with ``put(ids)`` and ``end()`` as in transformers (``put`` gets the
    prompt first, then each step's (B,) tokens). ``options``: ``stream_tokens``'s."""
    ids = batch["input_ids"].to(model.device)
    if streamer is not None:
        streamer.put(ids.cpu())
    on_step = None if streamer is None else (lambda step: streamer.put(step.tokens))
    steps = [s.tokens.to(ids.device) for s in stream_tokens(model, batch, params, on_step, **options)]
    if streamer is not None:
        streamer.end()
    return torch.cat([ids, torch.stack(steps, 1)], dim=1) if steps else ids
