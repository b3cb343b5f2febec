"""Lock-step generation for one batch: prefill once, then decode token by token with a static
KV cache, each row stopping on its own (its later slots are filled with the pad id).

This is what ``Qwen3VL.generate`` runs; the serving engine (continuous batching) reuses the same
model pieces with per-slot cache windows instead.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..model.text import AttnContext
from .kv_cache import KVCache, Window
from .sampling import Sampler, SamplingParams, SamplingState

# Keys of a processor batch that the model consumes; others (e.g. mm_token_type_ids) are ignored.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class Step:
    tokens: torch.Tensor  # (B,) long, pad id for rows already finished
    finished: torch.Tensor  # (B,) bool, finished at or before this step
    stopped: torch.Tensor  # (B,) bool, this row produced a stop id at this step


def resolve_params(model, params: SamplingParams | None, **overrides) -> SamplingParams:
    """Defaults from the checkpoint's generation_config.json, then per-call overrides."""
    if params is not None:
        if overrides:
            raise TypeError("pass either a SamplingParams or keyword settings, not both")
        return params
    if "eos_token_id" in overrides:
        overrides["stop_token_ids"] = overrides.pop("eos_token_id")
    return SamplingParams.from_generation_config(model.generation_config, **overrides)


def pad_id(model) -> int:
    pad = model.generation_config.get("pad_token_id")
    if pad is None:
        eos = model.generation_config.get("eos_token_id", 151643)
        pad = eos[0] if isinstance(eos, list) else eos
    return int(pad)


@torch.inference_mode()
def stream_tokens(model, batch: dict, params: SamplingParams | list[SamplingParams]) -> Iterator[Step]:
    """Yield one ``Step`` per generated position until every row has stopped."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
    ids = inputs["input_ids"]
    b, t = ids.shape
    rows = params if isinstance(params, list) else [params] * b
    if len(rows) != b:
        raise ValueError(f"{len(rows)} SamplingParams for a batch of {b}")
    max_new = max(p.max_new_tokens for p in rows)
    device = model.device
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)

    prompt = model.prepare(**inputs)
    cache = KVCache(model.config.text, b, t + max_new, model.dtype, device)
    decoder = model.model.language_model
    cos, sin = model.rope(prompt.positions, model.dtype)
    win = Window(cache, slice(0, b), 0, mask.to(device), t)
    hidden = decoder(prompt.embeds, AttnContext(cos, sin, win.mask, win), prompt.visual_mask, prompt.deepstack)
    logits = model.lm_head(hidden[:, -1]).float()  # (B, V), owned here: reused as every step's buffer

    state = SamplingState.new(rows, [ids[i][mask[i]] for i in range(b)], logits.shape[-1], device)
    sampler = Sampler()
    width = max(len(p.stop_token_ids) for p in rows)
    stop_ids = torch.tensor([list(p.stop_token_ids) + [-1] * (width - len(p.stop_token_ids)) for p in rows],
                            dtype=torch.long, device=device).view(b, width)  # (B, n_stop), -1 = none
    limits = torch.tensor([p.max_new_tokens for p in rows], device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    pad = pad_id(model)
    # Generated tokens are text: all three MRoPE rows advance together from each row's next
    # position, so every step's rotary table is computed up front (one call, not one per step).
    steps = prompt.next_position.to(device)[:, None] + torch.arange(max_new, device=device)  # (B, new)
    cos_all, sin_all = model.rope(steps[None].expand(3, b, max_new), model.dtype)  # (B, new, D)
    for step in range(max_new):
        tokens = sampler(logits, state, scratch=True)  # (B,)
        tokens = torch.where(finished, torch.full_like(tokens, pad), tokens)
        stopped = (tokens[:, None] == stop_ids).any(1) & ~finished
        finished = finished | stopped | (limits <= step + 1)
        yield Step(tokens, finished, stopped)  # ``finished`` is rebound, never modified in place
        if bool(finished.all()):
            return
        win = Window(cache, slice(0, b), t + step, None, 1)
        x = decoder.embed_tokens(tokens[:, None])  # (B, 1, H)
        hidden = decoder(x, AttnContext(cos_all[:, step : step + 1], sin_all[:, step : step + 1], win.mask, win))
        logits.copy_(model.lm_head(hidden[:, -1]))  # into the same buffer: no fresh (B, V) pages per step


def generate(model, batch: dict, params: SamplingParams | list[SamplingParams], streamer=None) -> torch.Tensor:
    """-> (B, T + new) ids: the prompt followed by the generated tokens (pad after a row's end).
    ``streamer``: an object with ``put(ids)`` and ``end()`` as in transformers (``put`` gets the
    prompt first, then each step's (B,) tokens)."""
    ids = batch["input_ids"].to(model.device)
    if streamer is not None:
        streamer.put(ids.cpu())
    steps = []
    for s in stream_tokens(model, batch, params):
        steps.append(s.tokens)
        if streamer is not None:
            streamer.put(s.tokens.cpu())
    if streamer is not None:
        streamer.end()
    return torch.cat([ids, torch.stack(steps, 1)], dim=1) if steps else ids
