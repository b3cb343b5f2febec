"""Runs the model for the engine: prefill one request into a KV slot, decode a batch of slots.

Every call is one forward pass; nothing here knows about requests' sampling or stopping.
"""
from __future__ import annotations

import torch

from ..model.text import AttnContext
from .kv_cache import KVCache, Scatter, Window


class Runner:
    def __init__(self, model, slots: int, max_len: int, cuda_graphs: bool | None = None):
        self.model = model
        self.decoder = model.model.language_model
        self.slots, self.max_len = slots, max_len
        self.cache = KVCache(model.config.text, slots, max_len, model.dtype, model.device)
        if cuda_graphs is None:
            cuda_graphs = model.device.type == "cuda"
        self.graphs = None
        if cuda_graphs:
            from .cuda_graphs import GraphedDecoder

            self.graphs = GraphedDecoder(model, self.cache)
            self.graphs.warmup()

    @torch.inference_mode()
    def prefill(self, slot: int, inputs: dict) -> tuple[torch.Tensor, int]:
        """One prompt (batch 1) into ``slot`` -> (last-position logits (V,) float32, next MRoPE position)."""
        model = self.model
        t = inputs["input_ids"].shape[1]
        if t > self.max_len:
            raise ValueError(f"prompt of {t} tokens exceeds the maximum model length {self.max_len}")
        prompt = model.prepare(**inputs)
        cos, sin = model.rope(prompt.positions, model.dtype)
        self.cache.valid[slot] = False  # forget the slot's previous request
        win = Window(self.cache, slice(slot, slot + 1), 0, None, t)
        hidden = self.decoder(prompt.embeds, AttnContext(cos, sin, win.mask, win), prompt.visual_mask, prompt.deepstack)
        return model.lm_head(hidden[0, -1]).float(), int(prompt.next_position[0])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache_pos: torch.Tensor, end: int) -> torch.Tensor:
        """Slots 0..B-1 each take one token. tokens, positions (MRoPE), cache_pos: (B,) long;
        end = max(cache_pos) + 1. -> logits (B, V) float32."""
        if self.graphs is not None:
            dev = self.model.device
            return self.graphs.decode(tokens.to(dev), positions.to(dev), cache_pos.to(dev))
        model = self.model
        b = tokens.shape[0]
        device = model.device
        cos, sin = model.rope(positions.to(device).view(1, b, 1).expand(3, b, 1), model.dtype)
        sc = Scatter(self.cache, cache_pos.to(device), end)
        x = self.decoder.embed_tokens(tokens.to(device)[:, None])  # (B, 1, H)
        hidden = self.decoder(x, AttnContext(cos, sin, sc.mask, sc))
        return model.lm_head(hidden[:, -1]).float()
