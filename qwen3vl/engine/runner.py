"""Runs the model for the engine and for ``generate``: prefill prompts into KV slots (whole, or
the tail after a reused prefix), decode a batch of slots by one token. Every call is one
``model.step``; nothing here knows about sampling or stopping. ``prefilled_tokens`` counts the
positions run through prefill (padding included).
"""
from __future__ import annotations

import torch

from .cuda_graphs import GraphedDecoder
from .kv_cache import KVCache, Scatter, Window


class Runner:
    def __init__(self, model, slots: int, max_len: int, cuda_graphs: bool | None = None):
        self.model = model
        self.slots, self.max_len = slots, max_len
        self.cache = KVCache(model.config.text, slots, max_len, model.dtype, model.device)
        self.prefilled_tokens = 0
        if cuda_graphs is None:
            cuda_graphs = model.device.type == "cuda"
        self.graphs = None
        if cuda_graphs:
            self.graphs = GraphedDecoder(model, self.cache)
            self.graphs.warmup()

    @torch.inference_mode()
    def prefill(self, slot: int, inputs: dict) -> tuple[torch.Tensor, int]:
        """One prompt (batch 1) into ``slot`` -> (last-position logits (V,) float32, next MRoPE position)."""
        logits, next_position = self.prefill_rows(slot, inputs)
        return logits[0], int(next_position[0])

    @torch.inference_mode()
    def prefill_rows(self, first_slot: int, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of B prompts (left-padded where ``inputs["attention_mask"]`` says so) into slots
        first_slot..first_slot+B-1 -> (last-position logits (B, V) float32, next MRoPE positions (B,))."""
        model = self.model
        b, t = inputs["input_ids"].shape
        if t > self.max_len:
            raise ValueError(f"prompt of {t} tokens exceeds the maximum model length {self.max_len}")
        prompt = model.prepare(**inputs)
        mask = inputs.get("attention_mask")
        valid = None if mask is None else mask.to(model.device, torch.bool)  # (B, T)
        rows = slice(first_slot, first_slot + b)
        self.cache.valid[rows] = False  # forget the slots' previous requests
        view = Window(self.cache, rows, 0, valid, t)
        logits = model.step(prompt.embeds, prompt.positions, view, prompt.visual_mask, prompt.deepstack, 1)
        self.prefilled_tokens += b * t
        return logits[:, -1].float(), prompt.next_position

    @torch.inference_mode()
    def prefill_tail(self, slot: int, start: int, embeds: torch.Tensor, positions: torch.Tensor,
                     visual_mask: torch.Tensor | None, deepstack: list) -> torch.Tensor:
        """The last T tokens of one prompt into ``slot``, whose first ``start`` positions already
        hold the prompt's head (``KVCache.reset(slot, start)`` done). embeds (1, T, H), positions
        (3, 1, T) (the whole prompt's MRoPE positions from ``start`` on), visual_mask (1, T) and
        DeepStack features as ``model.step`` takes them -> last-position logits (1, V) float32."""
        t = embeds.shape[1]
        view = Window(self.cache, slice(slot, slot + 1), start, None, t)
        logits = self.model.step(embeds, positions.to(self.model.device), view, visual_mask, deepstack, 1)
        self.prefilled_tokens += t
        return logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache_pos: torch.Tensor, end: int) -> torch.Tensor:
        """Slots 0..B-1 each take one token. tokens, positions (MRoPE), cache_pos: (B,) long;
        end = max(cache_pos) + 1. -> logits (B, V) float32."""
        device = self.model.device
        if self.graphs is not None:
            return self.graphs.decode(tokens.to(device), positions.to(device), cache_pos.to(device))
        view = Scatter(self.cache, cache_pos.to(device), end)
        return self.model.decode_step(tokens.to(device), positions.to(device), view)

