"""Mixture-of-experts layers across ranks: the router is replicated (every rank routes every
token identically), and either

* expert parallel (``enable_expert_parallel``): rank r holds experts [r*E/N, (r+1)*E/N) whole and
  runs only the tokens routed to them, or
* tensor parallel: every rank holds every expert's gate/up split by width and down_proj by the
  same input columns (like a dense MLP).

Both give each rank a partial sum of the block's output, all-reduced once per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import reference
from ..model.text import SparseMoE
from ..quant import QuantExperts
from .comm import all_reduce_
from .shard import ShardPlan


class ExpertShard(nn.Module):
    """This rank's part of a stacked (E, N, K) expert parameter (our layout): experts
    [e0, e1), rows ``rows`` ((lo, hi, local_lo) ranges), input columns ``cols``; stored in the
    model dtype or as ``QuantExperts``. The loader hands it the whole stack (``load_weight``)."""

    def __init__(self, old, experts: tuple[int, int], rows: list, cols: tuple[int, int] | None, dtype):
        super().__init__()
        e, n, k = old.logical_shape if isinstance(old, QuantExperts) else tuple(old.shape)
        self.logical_shape, self.experts, self.rows, self.cols = (e, n, k), experts, rows, cols
        ne = experts[1] - experts[0]
        n_loc = sum(hi - lo for lo, hi, _ in rows)
        k_loc = k if cols is None else cols[1] - cols[0]
        self.quant = None
        if isinstance(old, QuantExperts):
            if old.mode == "int4" and k_loc % old.group_size:
                raise ValueError(f"int4 group size {old.group_size} must divide each rank's {k_loc} expert input "
                                 f"columns ({k} in all): use expert parallel, a smaller group or parallel size")
            self.quant = QuantExperts(ne, k_loc, n_loc, old.mode, old.group_size, device="meta")
        else:
            self.stack = nn.Parameter(torch.empty(ne, n_loc, k_loc, dtype=dtype, device="meta"))

    @torch.no_grad()
    def load_weight(self, rows, w: torch.Tensor, expert: int | None = None) -> None:
        """w: the whole (E, N, K) stack (any strides), or with ``expert`` the rows ``rows`` of
        that expert alone (checkpoints storing one tensor per expert)."""
        e0, e1 = self.experts
        if expert is None:
            w, a, e_loc = w[e0:e1], 0, None
        elif e0 <= expert < e1:
            w, a, e_loc = w[None], (rows or (0,))[0], expert - e0
        else:
            return  # another rank's expert
        b = a + w.shape[1]
        for lo, hi, at in self.rows:
            s, e = max(lo, a), min(hi, b)
            if s >= e:
                continue
            piece = w[:, s - a : e - a] if self.cols is None else w[:, s - a : e - a, self.cols[0] : self.cols[1]]
            local = (at + s - lo, at + e - lo)
            if self.quant is not None:
                self.quant.load_weight(local, piece if e_loc is None else piece[0], expert=e_loc)
            else:
                dst = self.stack if e_loc is None else self.stack[e_loc : e_loc + 1]
                dst[:, local[0] : local[1]].copy_(piece)

    def linear(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x (n, K_local) @ local expert e's matrix.T -> (n, N_local)."""
        if self.quant is None:
            return F.linear(x, self.stack[e])
        if "int8_gemv" not in self.quant.ops.compiled and self.quant.in_features % 32:
            # torch's stock int8pack kernel (no compiled kernels) crashes on such narrow slices
            # (a tiny model's experts split in two): the dequantized matrix instead.
            return F.linear(x, self.quant.dequantized((e,)).to(x.dtype))
        return self.quant.linear(e, x)


class ParallelMoE(SparseMoE):
    """``SparseMoE``'s routing with this rank's experts (or expert slices); output all-reduced."""

    def __init__(self, moe: SparseMoE, plan: ShardPlan):
        nn.Module.__init__(self)
        self.gate, self.top_k, self.norm_topk = moe.gate, moe.top_k, moe.norm_topk
        e, i = moe.gate.out_features, moe.intermediate
        dtype = moe.gate.weight.dtype
        if plan.expert_parallel:
            self.local = (plan.rank * e // plan.world, (plan.rank + 1) * e // plan.world)
            if self.local[0] == self.local[1]:
                raise ValueError(f"expert parallel size {plan.world} exceeds the {e} experts")
            rows_gu, cols = [(0, 2 * i, 0)], None  # whole experts
            self.intermediate = i
        else:
            self.local = (0, e)
            a, b = plan.split(i, "the MoE intermediate size")
            rows_gu, cols = [(a, b, 0), (i + a, i + b, b - a)], (a, b)  # [gate | up] slices, down's columns
            self.intermediate = b - a
        rows_d = [(0, moe.gate.in_features, 0)]
        self.gate_up_proj = ExpertShard(moe.gate_up_proj, self.local, rows_gu, None, dtype)
        self.down_proj = ExpertShard(moe.down_proj, self.local, rows_d, cols, dtype)
        self.last_expert_counts = None

    def use_ops(self, ops) -> None:
        self.ops = ops  # the experts run F.linear / QuantExperts.linear (no multi-expert kernels here)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of local expert ``e``: (n, H) -> partial (n, H)."""
        return self.down_proj.linear(e, reference.silu_mul(self.gate_up_proj.linear(e, x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        weights, experts = self.route(x)  # (N, k)
        flat = experts.reshape(-1)  # (N*k,)
        counts = torch.bincount(flat, minlength=self.gate.out_features)  # (E,)
        self.last_expert_counts = counts
        order = flat.argsort(stable=True)
        token_of = order // self.top_k  # (N*k,) token of each sorted assignment
        w_sorted = weights.reshape(-1)[order, None]  # (N*k, 1)
        out = torch.zeros_like(x)
        counts = counts.tolist()
        start = sum(counts[: self.local[0]])
        for e in range(*self.local):
            n = counts[e]
            if n:
                tok = token_of[start : start + n]
                out.index_add_(0, tok, self.expert(e - self.local[0], x[tok]) * w_sorted[start : start + n])
            start += n
        return all_reduce_(out).reshape(shape)


def shard_moe(moe: SparseMoE, plan: ShardPlan) -> ParallelMoE:
    return ParallelMoE(moe, plan)
