"""Preallocated (static) KV cache: one (layers, slots, kv_heads, max_len, head_dim) tensor pair.

Nothing is concatenated per step. A forward call binds a *window* of the cache:

* ``Window(cache, rows, start, new_valid)``: the rows ``rows`` (a slice of slots) write T new
  tokens at the same cache index ``start``; used for prefill and for lock-step decoding of a
  left-padded batch. Padded slots are remembered in ``valid`` and masked out of attention.
* ``Scatter(cache, positions)``: slots 0..B-1 each write ONE token at their own index
  (continuous batching, where requests have different lengths).

Each window also builds the attention mask once per forward call, shared by all layers.
"""
from __future__ import annotations

import torch

from ..config import TextConfig


class KVCache:
    def __init__(self, cfg: TextConfig, slots: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, nkv, S, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(slots, max_len, dtype=torch.bool, device=device)  # (B, S) real token?
        self.padded = [False] * slots  # host copy: does the slot hold padding (needs a mask)?
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class Window:
    """Rows ``rows`` write T tokens at cache index ``start`` (same for every row)."""

    def __init__(self, cache: KVCache, rows: slice, start: int, new_valid: torch.Tensor | None, t: int):
        """new_valid: (B, T) bool for the new tokens (None: all real)."""
        if start + t > cache.max_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds the KV cache length {cache.max_len}")
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
        self.mask = None if plain else self._causal(valid[:, : self.end])
        # One token per row: (first slot, each row's cache index, end) for the one-call decode step
        # (qwen3vl.model.text._decode_step); the rows are consecutive slots.
        self.decode_rows = (slots[0], [start] * len(slots), self.end) if t == 1 else None

    def _causal(self, valid: torch.Tensor) -> torch.Tensor:
        q = torch.arange(self.start, self.end, device=valid.device)[:, None]  # (T, 1) cache index
        k = torch.arange(self.end, device=valid.device)[None, :]  # (1, end)
        # A padded query attends to itself only, so no row is empty (NaN in SDPA).
        mask = (valid[:, None, :] & (k <= q)[None]) | (k == q)[None]  # (B, T, end)
        return mask[:, None]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: (B, nkv, T, D) -> all keys/values of these rows up to the new end."""
        kc, vc = self.cache.k[layer, self.rows], self.cache.v[layer, self.rows]  # views
        kc[:, :, self.start : self.end] = k
        vc[:, :, self.start : self.end] = v
        return kc[:, :, : self.end], vc[:, :, : self.end]


class Scatter:
    """Slots 0..B-1 each write one token at their own cache index ``positions[b]``."""

    def __init__(self, cache: KVCache, positions: torch.Tensor, end: int):
        """positions: (B,) long cache index per slot; end: max(positions) + 1 (a host int)."""
        if end > cache.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the KV cache length {cache.max_len}")
        b = positions.shape[0]
        self.cache, self.pos, self.end, self.rows = cache, positions, end, torch.arange(b, device=positions.device)
        cache.valid[self.rows, positions] = True
        # See Window. Only for CPU positions: the one-call step is a CPU path, and the host copy
        # would cost a device sync elsewhere.
        self.decode_rows = (0, positions.tolist(), end) if positions.device.type == "cpu" else None
        if b == 1 and not cache.padded[0]:
            self.mask = None  # one sequence, no padding: attend to everything written
            return
        k = torch.arange(end, device=positions.device)[None, :]  # (1, end)
        p = positions[:, None]  # (B, 1)
        self.mask = ((cache.valid[:b, :end] & (k <= p)) | (k == p))[:, None, None, :]  # (B, 1, 1, end)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        b = k.shape[0]
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # (slots, nkv, S, D)
        kc[self.rows, :, self.pos] = k[:, :, 0]
        vc[self.rows, :, self.pos] = v[:, :, 0]
        return kc[:b, :, : self.end], vc[:b, :, : self.end]
