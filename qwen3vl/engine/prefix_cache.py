"""Prefix cache: KV blocks of earlier sequences, reused by prompts that start the same way.

A sequence is cut into blocks of ``block`` tokens; block i is keyed by a hash chain: blake2b over
block i-1's key, block i's token ids, its MRoPE positions and the content keys of the media whose
placeholder tokens it holds (``encoder_cache.media_key``). Equal keys therefore mean equal
inputs for every token up to the block's end (the attention is causal), so equal keys and values.
Only full blocks are kept.

The blocks live in one pool, (layers, blocks, kv_heads, block, head_dim) for keys and another for
values, sized from a byte budget and allocated at the first store (a private ``Engine`` that never
stores allocates nothing). A hit copies blocks into a request's KV slot (memory-bound, far cheaper
than recomputing them); a request's blocks are stored from its slot after its prefill (so the
other choices of an ``n > 1`` request hit at once) and when it ends (prompt + answer, which the
next turn of a chat starts with). Eviction is least recently used first, and the blocks of a chain
are touched deepest first, so a chain loses its tail before its head.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..config import TextConfig
from .kv_cache import KVCache


def block_keys(ids: torch.Tensor, positions: torch.Tensor, owners: torch.Tensor, media: list[bytes], block: int,
               prev: list[bytes] = ()) -> list[bytes]:
    """Keys of the full blocks of a sequence, continuing the chain ``prev`` (keys of its first
    blocks, already known). ids: (T,) long; positions: (3, T) long MRoPE positions; owners: (T,)
    long, index into ``media`` of the item a placeholder token belongs to, -1 for other tokens."""
    keys = list(prev)
    ids, positions, owners = ids.cpu(), positions.cpu(), owners.cpu()
    for i in range(len(keys), ids.shape[0] // block):
        s = slice(i * block, (i + 1) * block)
        h = hashlib.blake2b(keys[-1] if keys else b"", digest_size=16)
        h.update(ids[s].numpy().tobytes())
        h.update(positions[:, s].contiguous().numpy().tobytes())
        items = owners[s]
        for j in torch.unique_consecutive(items[items >= 0]).tolist():
            h.update(media[j])
        keys.append(h.digest())
    return keys


@dataclass
class SequenceKeys:
    """What a request's blocks are keyed by, kept from its prefill to its end."""

    positions: torch.Tensor  # (3, T) long: the prompt's MRoPE positions
    owners: torch.Tensor  # (T,) long: media item of each prompt token, -1 for none
    media: list[bytes]  # the items' content keys
    keys: list[bytes]  # keys of the prompt's full blocks
    next_position: int  # MRoPE position of the first generated token

    def extended(self, prompt: torch.Tensor, generated: list[int], block: int,
                 media_ids: tuple[int, int]) -> list[bytes]:
        """Keys of the full blocks of prompt (T,) + ``generated`` (tokens whose keys and values
        are in the slot). A generated media placeholder ends the sequence there: it has no
        pixels, so no later prompt reuses what follows it."""
        stop = next((i for i, tok in enumerate(generated) if tok in media_ids), len(generated))
        gen = torch.tensor(generated[:stop], dtype=torch.long)
        ids = torch.cat([prompt.cpu(), gen])
        pos = torch.cat([self.positions, (self.next_position + torch.arange(stop)).expand(3, stop)], 1)  # (3, T')
        owners = torch.cat([self.owners, torch.full((stop,), -1, dtype=torch.long)])
        return block_keys(ids, pos, owners, self.media, block, self.keys)


class PrefixCache:
    def __init__(self, cfg: TextConfig, budget: int, block: int, dtype: torch.dtype, device):
        self.block = block
        self.shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, block, cfg.head_dim)
        per_block = 2 * torch.Size(self.shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.capacity = budget // per_block  # blocks that fit the budget
        self.dtype, self.device = dtype, device
        self.k = self.v = None  # (L, blocks, nkv, block, D) each, at the first store
        self._table: OrderedDict[bytes, int] = OrderedDict()  # key -> pool block, least recent first
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._table)

    def match(self, keys: list[bytes]) -> list[int]:
        """Pool blocks of the longest run of ``keys`` from the first that is cached."""
        found = []
        for key in keys:
            b = self._table.get(key)
            if b is None:
                break
            found.append(b)
        self._touch(keys[: len(found)])
        return found

    def load(self, cache: KVCache, slot: int, blocks: list[int]) -> int:
        """Copy pool blocks into ``slot``'s first len(blocks) * block positions -> tokens loaded."""
        n = len(blocks) * self.block
        if blocks:
            idx = torch.tensor(blocks, device=self.device)
            for pool, store in ((self.k, cache.k), (self.v, cache.v)):
                dst = store[:, slot, :, :n].unflatten(2, (len(blocks), self.block))  # (L, nkv, n, block, D)
                dst.copy_(pool[:, idx].transpose(1, 2))
        return n

    def save(self, cache: KVCache, slot: int, keys: list[bytes]) -> None:
        """Store the blocks of ``slot`` that ``keys`` (its first full blocks) name and the pool
        lacks, evicting least recently used blocks of other chains when full."""
        if self.capacity == 0 or not keys:
            return
        chain = set(keys)
        self._touch([k for k in keys if k in self._table])  # never evicted for this chain's new blocks
        new_seq, new_pool = [], []
        for i, key in enumerate(keys):
            if key in self._table:
                continue
            b = self._allocate(chain)
            if b is None:
                break  # the pool holds nothing but this chain
            self._table[key] = b
            new_seq.append(i)
            new_pool.append(b)
        if new_seq:
            n = max(new_seq) + 1
            seq = torch.tensor(new_seq, device=self.device)
            idx = torch.tensor(new_pool, device=self.device)
            for pool, store in ((self.k, cache.k), (self.v, cache.v)):
                src = store[:, slot, :, : n * self.block].unflatten(2, (n, self.block))  # (L, nkv, n, block, D)
                pool[:, idx] = src[:, :, seq].transpose(1, 2)
        self._touch([k for k in keys if k in self._table])

    def _allocate(self, chain: set[bytes]) -> int | None:
        if self.k is None:
            shape = (self.shape[0], self.capacity, *self.shape[1:])
            # torch.empty: on the CPU the pages are only taken as blocks are written.
            self.k = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.v = torch.empty(shape, dtype=self.dtype, device=self.device)
            self._free = list(range(self.capacity - 1, -1, -1))
        if self._free:
            return self._free.pop()
        oldest = next(iter(self._table))
        if oldest in chain:
            return None
        return self._table.pop(oldest)

    def _touch(self, keys: list[bytes]) -> None:
        """Most recent last, deepest first: a chain's head outlives its tail."""
        for key in reversed(keys):
            self._table.move_to_end(key)
