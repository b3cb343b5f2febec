"""What one forward step needs from a KV cache: a *cache view*, declared here and implemented by
the engine (``qwen3vl.engine.kv_cache``), so the model knows nothing of slots or cache layout.

Also the one attention-mask rule every view (and the cache-less forward) uses.
"""
from __future__ import annotations

from typing import Protocol

import torch


class CacheView(Protocol):
    """One forward call's binding of a KV cache.

    mask:         (B, 1, T, L) bool, True = may attend; None = plain causal over the new tokens
                  (T > 1) or every key (T == 1).
    decode_rows:  when every row adds ONE token: (first cache slot, each row's cache index, end),
                  the rows being consecutive slots, for the one-call decode step; else None.
    """

    mask: torch.Tensor | None
    decode_rows: tuple[int, list[int], int] | None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values k, v (B, Hkv, T, D) of ``layer`` -> all keys/values these
        rows attend to, (B, Hkv, L, D)."""
        ...

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value stores, (layers, slots, Hkv, S, D) each (one-call decode step)."""
        ...


class Uncached:
    """The cache view of a forward without a cache: nothing stored, the new tokens attend to each
    other only (``valid`` (B, T) bool marks real tokens; None: no padding)."""

    decode_rows = None

    def __init__(self, valid: torch.Tensor | None = None):
        padded = valid is not None and not bool(valid.all())
        t = 0 if valid is None else valid.shape[1]
        self.mask = causal_mask(valid, torch.arange(t, device=valid.device)[None]) if padded else None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("a cache-less forward has no key/value stores")


# Masks of more elements than this are built block by block of query rows inside attention
# (``CausalMask``): a 32K-token padded prompt would otherwise hold a 1 GB (T x L) bool mask.
MASK_ELEMENTS = 1 << 24


def causal_mask(valid: torch.Tensor, query: torch.Tensor):
    """The attention rule: a query at cache index q may see key k when the key holds a real token
    and k <= q; a padded query sees itself only, so no row is empty (an empty row gives NaN).

    valid: (B, L) bool, real tokens among the keys; query: (B or 1, T) long, the queries' cache
    indices -> (B, 1, T, L) bool, or past ``MASK_ELEMENTS`` a ``CausalMask`` that builds its rows
    on demand (the attention op takes either)."""
    if query.shape[-1] > 1 and query.shape[-1] * valid.shape[1] > MASK_ELEMENTS:  # decode: always a tensor
        return CausalMask(valid, query)
    k = torch.arange(valid.shape[1], device=valid.device)  # (L,)
    q = query[..., None]  # (B|1, T, 1)
    return ((valid[:, None, :] & (k <= q)) | (k == q))[:, None]


class CausalMask:
    """``causal_mask``'s (B, 1, T, L) mask, never materialised whole: ``rows(start, stop)`` gives
    query rows start..stop-1, (B, 1, stop - start, L) bool. ``valid`` must not change while the
    forward call that uses it runs (the views write it before)."""

    def __init__(self, valid: torch.Tensor, query: torch.Tensor):
        self.valid, self.query = valid, query  # (B, L), (B|1, T)
        self.shape = (valid.shape[0], 1, query.shape[-1], valid.shape[1])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        k = torch.arange(self.valid.shape[1], device=self.valid.device)  # (L,)
        q = self.query[:, start:stop, None]  # (B|1, n, 1)
        return ((self.valid[:, None, :] & (k <= q)) | (k == q))[:, None]
