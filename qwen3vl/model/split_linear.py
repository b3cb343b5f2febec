"""Fused projections kept as the checkpoint's separate matrices, where they lie (``SplitLinear``).

The decoder's q/k/v and gate/up are one matrix each at run time (``qkv_proj``, ``gate_up_proj``:
one GEMM), made by concatenating the checkpoint's tensors: new memory the size of ~40 % of the
model, built and (with the weight cache) written to disk. When the checkpoint's tensors already
have the runtime dtype, a memory-mapped load (``qwen3vl.model.weight_cache``) uses them in place
instead: nothing is copied, converted or written at start-up. The cost is one product per part
(prefill: a GEMM each, then one concatenation of the outputs; decode: a matrix-vector product
each, the same dot product per output row as the fused matrix's).

A split model names the parts ``<projection>.parts.<i>`` (q, k, v / gate, up) instead of
``<projection>.weight``; ``fused_weight()`` gives the concatenated matrix (a copy).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..kernels import HoldsOps
from ..weights import name_table
from .text import Linear


class SplitLinear(HoldsOps, nn.Module):
    """A bias-free Linear whose weight rows are ``parts`` (each (N_i, K)): out = [x W_0^T | x W_1^T | ...]."""

    bias = None

    def __init__(self, in_features: int, sizes: list[int], dtype: torch.dtype, device="meta"):
        super().__init__()
        self.in_features, self.out_features = in_features, sum(sizes)
        self.parts = nn.ParameterList(nn.Parameter(torch.empty(n, in_features, dtype=dtype, device=device))
                                      for n in sizes)

    def use_ops(self, ops: kernels.Ops) -> None:
        ok = all(w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous() for w in self.parts)
        self.ops = ops if ok else kernels.REFERENCE

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., sum N_i)
        return torch.cat([self.ops.linear(x, w, None) for w in self.parts], -1)

    def kernel_rows(self) -> int:
        return self.ops.linear_rows(self.in_features)

    def kernel_weights(self) -> list[torch.Tensor] | None:
        """The parts, as ``kernels.decode_layers`` takes a split bf16 projection (None off the kernels)."""
        return list(self.parts) if "linear" in self.ops.compiled else None

    def fused_weight(self) -> torch.Tensor:
        return torch.cat(list(self.parts))  # (sum N_i, K)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, parts={[p.shape[0] for p in self.parts]}"


def split_sources(model: nn.Module, found: dict, params: list[str]) -> dict[str, list] | None:
    """For each fused weight in ``params`` (names of ``model``'s parameters), its checkpoint tensors
    (``found`` entries) in row order, when every one of them has the parameter's dtype and rows
    and the module is a bias-free ``Linear``; None when any parameter is not such a weight."""
    parts: dict[str, list] = {p: [] for p in params}
    for src, tgt in name_table(model.config).items():
        if tgt.param in parts and tgt.rows is not None and tgt.expert is None and not tgt.expert_layout:
            parts[tgt.param].append((tgt.rows, found.get(src)))
    out = {}
    for param, rows in parts.items():
        module = model.get_submodule(param.rsplit(".", 1)[0])
        if not param.endswith(".weight") or type(module) is not Linear or module.bias is not None or not rows:
            return None
        rows.sort(key=lambda r: r[0])
        w, start = module.weight, 0
        for (r0, r1), entry in rows:  # the parts tile the rows in order, each as the file holds it
            if (r0 != start or entry is None or entry.dtype != w.dtype or entry.shape != (r1 - r0, w.shape[1])
                    or entry.offset % entry.dtype.itemsize):
                return None
            start = r1
        if start != w.shape[0]:
            return None
        out[param] = [entry for _, entry in rows]
    return out


def split(model: nn.Module, sources: dict[str, list]) -> dict[str, object]:
    """Replace each fused Linear named in ``sources`` (``split_sources``) by a meta ``SplitLinear``
    -> {part parameter name: its checkpoint entry}."""
    out = {}
    for param, entries in sources.items():
        name = param.rsplit(".", 1)[0]
        parent, attr = (model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1])
        old = getattr(parent, attr)
        setattr(parent, attr, SplitLinear(old.in_features, [e.shape[0] for e in entries], old.weight.dtype))
        out.update({f"{name}.parts.{i}": e for i, e in enumerate(entries)})
    return out
