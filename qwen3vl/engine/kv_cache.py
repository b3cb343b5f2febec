"""Preallocated (static) KV cache: one (layers, slots, kv_heads, max_len, head_dim) tensor pair.

Nothing is concatenated per step. A forward call binds a *view* of the cache (the model's
``CacheView`` protocol, ``qwen3vl.model.cache_view``):

* ``Window(cache, rows, start, new_valid, t)``: the rows ``rows`` (a slice of slots) write T new
  tokens at the same cache index ``start``; used for prefill and for lock-step decoding of a
  left-padded batch. Padded slots are remembered in ``valid`` and masked out of attention.
* ``Scatter(cache, positions, end)``: slots 0..B-1 each write ONE token at their own index
  (continuous batching, where requests have different lengths). ``full_length=True`` attends
  over the whole cache length behind a mask (fixed shapes, for CUDA-graph capture).

Each view builds its attention mask once per forward call (shared by all layers), with the
model's one mask rule (``causal_mask``).
"""
from __future__ import annotations

import torch

from ..config import TextConfig
from ..model.cache_view import causal_mask


class KVCache:
    def __init__(self, cfg: TextConfig, slots: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, nkv, S, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(slots, max_len, dtype=torch.bool, device=device)  # (B, S) real token?
        self.padded = [False] * slots  # host copy: does the slot hold padding (needs a mask)?
        self.max_len = max_len

    def reset(self, slot: int, kept: int = 0) -> None:
        """A new sequence in ``slot`` whose first ``kept`` positions are already written (reused
        prefix blocks): the rest is forgotten, and the slot holds no padding."""
        self.valid[slot] = False
        self.valid[slot, :kept] = True
        self.padded[slot] = False

    def check_room(self, end: int) -> None:
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the KV cache length {self.max_len}")


class Window:
    """Rows ``rows`` write T tokens at cache index ``start`` (same for every row)."""

    def __init__(self, cache: KVCache, rows: slice, start: int, new_valid: torch.Tensor | None, t: int):
        """new_valid: (B, T) bool for the new tokens (None: all real)."""
        cache.check_room(start + t)
        self.cache, self.rows, self.start, self.end = cache, rows, start, start + t
        valid = cache.valid[rows]  # (B, S) view
        valid[:, start:self.end] = True if new_valid is None else new_valid
        slots = range(*rows.indices(len(cache.padded)))
        if start == 0:  # a new prompt: the slot forgets its previous padding
            for i in slots:
                cache.padded[i] = False
        if new_valid is not None and not bool(new_valid.all()):
            for i in slots:
                cache.padded[i] = True
        padded = any(cache.padded[i] for i in slots)
        # No padding: plain causal attention (from the first token) or none (one new token) is exact.
        plain = not padded and (start == 0 or t == 1)
        query = torch.arange(start, self.end, device=valid.device)[None]  # (1, T) cache index
        self.mask = None if plain else causal_mask(valid[:, : self.end], query)
        self.decode_rows = (slots[0], [start] * len(slots), self.end) if t == 1 else None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: (B, nkv, T, D) -> all keys/values of these rows up to the new end."""
        kc, vc = self.cache.k[layer, self.rows], self.cache.v[layer, self.rows]  # views
        kc[:, :, self.start : self.end] = k
        vc[:, :, self.start : self.end] = v
        return kc[:, :, : self.end], vc[:, :, : self.end]

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.k, self.cache.v


class Scatter:
    """Slots 0..B-1 each write one token at their own cache index ``positions[b]``."""

    def __init__(self, cache: KVCache, positions: torch.Tensor, end: int | None = None, full_length: bool = False):
        """positions: (B,) long cache index per slot; end: max(positions) + 1 (a host int), or
        the cache length with ``full_length`` (then a mask is always built: shapes never vary)."""
        end = cache.max_len if full_length else end
        cache.check_room(end)
        b = positions.shape[0]
        self.cache, self.pos, self.end, self.rows = cache, positions, end, torch.arange(b, device=positions.device)
        cache.valid[self.rows, positions] = True
        # Only for CPU positions: the one-call step is a CPU path, and the host copy would cost a
        # device sync elsewhere.
        cpu = positions.device.type == "cpu" and not full_length
        self.decode_rows = (0, positions.tolist(), end) if cpu else None
        if b == 1 and not cache.padded[0] and not full_length:
            self.mask = None  # one sequence, no padding: attend to everything written
        else:
            self.mask = causal_mask(cache.valid[:b, :end], positions[:, None])  # (B, 1, 1, end)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        b = k.shape[0]
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # (slots, nkv, S, D)
        kc[self.rows, :, self.pos] = k[:, :, 0]
        vc[self.rows, :, self.pos] = v[:, :, 0]
        return kc[:b, :, : self.end], vc[:b, :, : self.end]

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.k, self.cache.v
