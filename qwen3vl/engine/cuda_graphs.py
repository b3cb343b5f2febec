"""CUDA-graph-captured decode steps for batch buckets (GPU only; the CPU path never uses this).

A decode step is a few hundred small kernels; on a GPU their launch overhead, not the math,
bounds batch-1 speed. A graph replays them in one launch, but needs fixed shapes and fixed
memory: so the step reads its inputs from static buffers, attends over the WHOLE cache length
with a mask built inside the graph from ``cache.valid`` (``Scatter(..., full_length=True)``: no
data-dependent slicing), and writes its K/V at per-row positions, through the same
``model.decode_step`` the eager runner uses.

``StaticDecodeStep`` is that shape-stable step; it runs eagerly on any device, which is how the
CPU tests check it against the normal path. ``GraphedDecoder`` captures it per batch bucket.
"""
from __future__ import annotations

import torch

from .kv_cache import KVCache, Scatter

BUCKETS = (1, 2, 4, 8, 16, 32)


class StaticDecodeStep:
    """Decode one token for slots 0..B-1 from static buffers; ``run()`` fills ``self.logits``."""

    def __init__(self, model, cache: KVCache, batch: int):
        dev = model.device
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)  # (B,)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)  # (B,) MRoPE position
        self.cache_pos = torch.zeros(batch, dtype=torch.long, device=dev)  # (B,) cache index
        self.logits: torch.Tensor | None = None

    def run(self) -> torch.Tensor:
        view = Scatter(self.cache, self.cache_pos, full_length=True)
        self.logits = self.model.decode_step(self.tokens, self.positions, view)  # (B, V)
        return self.logits

    def load(self, tokens: torch.Tensor, positions: torch.Tensor, cache_pos: torch.Tensor) -> None:
        """Copy a (possibly smaller) batch into the buffers; extra rows decode a dummy token."""
        n = tokens.shape[0]
        for buf, src in ((self.tokens, tokens), (self.positions, positions), (self.cache_pos, cache_pos)):
            buf.zero_()
            buf[:n].copy_(src, non_blocking=True)


class GraphedDecoder:
    """One captured graph per batch bucket; ``decode(tokens, positions, cache_pos)`` -> (n, V)."""

    def __init__(self, model, cache: KVCache, buckets=BUCKETS):
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        slots = cache.k.shape[1]
        self.buckets = [b for b in buckets if b <= slots]
        self.steps: dict[int, StaticDecodeStep] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.model, self.cache = model, cache

    def _capture(self, b: int) -> None:
        step = StaticDecodeStep(self.model, self.cache, b)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm up kernels and allocator outside the graph
                step.run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            step.run()
        self.steps[b], self.graphs[b] = step, graph

    def warmup(self) -> None:
        """Capture every bucket now (at load), not in the first request."""
        for b in self.buckets:
            self._capture(b)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache_pos: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        b = next((x for x in self.buckets if x >= n), None)
        if b is None:
            raise ValueError(f"batch {n} exceeds the largest captured bucket {self.buckets[-1]}")
        if b not in self.graphs:
            self._capture(b)
        step = self.steps[b]
        step.load(tokens, positions, cache_pos)
        self.graphs[b].replay()
        return step.logits[:n]
