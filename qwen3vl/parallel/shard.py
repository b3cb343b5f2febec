"""Tensor-parallel sharding of the text decoder, applied to a model built on the meta device
BEFORE its weights load (gpt-fast ``tp.py`` style; PyTorch's ``distributed.tensor.parallel``
names the same splits):

* q/k/v (fused ``qkv_proj``) and gate/up (fused ``gate_up_proj``): column-parallel, split by
  attention head / by intermediate width; no communication.
* o_proj and down_proj: row-parallel (split along their input), output all-reduced.
* KV heads: split when their count divides by the world size, else each rank keeps the one KV
  head its query heads read (replicated across ``world / num_kv_heads`` ranks).
* q_norm / k_norm (one weight per head dim, shared by all heads), layer norms, MoE routers:
  replicated.
* lm_head: split by vocabulary, slices gathered on rank 0 (which alone samples): the largest
  matrix of the small models (2B: 311 M of 1.7 B decoder+head weights) streams at 1/N per rank.
* Token embedding and vision encoder: on rank 0 only, which broadcasts the prompt's embeddings
  (``runner.py``). Other ranks keep an empty stand-in (``EmbeddingSink``), so they hold neither.

Every sharded module keeps the checkpoint's full (logical) shape for the loader's shape checks
and takes its slice in ``load_weight(rows, tensor)`` (the loader's hook, see
``qwen3vl.weights._Destinations``): each rank stores only its shard, in every weight format
(bf16/fp32 copied, int8/int4 quantized slice by slice; int4 column splits on group boundaries).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import TextConfig
from ..model.text import Attention, Linear, MLP
from ..quant import QuantLinear
from .comm import all_reduce_, gather_last


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    world: int
    expert_parallel: bool = False

    def split(self, n: int, what: str) -> tuple[int, int]:
        """This rank's even share [lo, hi) of n items (n must divide by the world size)."""
        if n % self.world:
            raise ValueError(f"tensor parallel size {self.world} must divide {what} ({n})")
        k = n // self.world
        return self.rank * k, (self.rank + 1) * k

    def kv_heads(self, nh: int, nkv: int) -> tuple[int, int]:
        """This rank's KV heads [lo, hi): split when nkv divides by the world size, else the one
        head its query heads belong to (world must then divide by nkv)."""
        self.split(nh, "the number of attention heads")
        if nkv % self.world == 0:
            return self.split(nkv, "the number of KV heads")
        if self.world % nkv:
            raise ValueError(f"tensor parallel size {self.world} and {nkv} KV heads: one must divide the other")
        h = self.rank // (self.world // nkv)
        return h, h + 1


class _ShardedLoad:
    """Mixin for a projection holding a shard of a checkpoint matrix. ``shard_rows``: logical
    row ranges (lo, hi, local_lo) kept; ``shard_cols``: the kept input columns (row-parallel) or
    None; ``combine``: "" (column-parallel), "sum" (all-reduce) or "gather" (vocab split)."""

    full_shape: tuple[int, int]
    shard_rows: list[tuple[int, int, int]]
    shard_cols: tuple[int, int] | None
    combine: str

    @property
    def logical_shape(self) -> tuple[int, int]:
        return self.full_shape

    @torch.no_grad()
    def load_weight(self, rows: tuple[int, int] | None, w: torch.Tensor, expert: int | None = None) -> None:
        """The checkpoint rows ``rows`` (None: all) of the logical matrix -> the kept part
        (``expert`` is for expert stacks only, never set here)."""
        a = 0 if rows is None else rows[0]
        b = a + w.shape[0]
        for lo, hi, at in self.shard_rows:
            s, e = max(lo, a), min(hi, b)
            if s < e:
                piece = w[s - a : e - a]
                if self.shard_cols is not None:
                    piece = piece[:, self.shard_cols[0] : self.shard_cols[1]]
                self._load_local((at + s - lo, at + e - lo), piece)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.combine == "sum":
            return all_reduce_(y)
        if self.combine == "gather":
            return gather_last(y, self.full_shape[0])
        return y

    def kernel_weights(self):
        # The one-call decode step of a layer cannot all-reduce between o_proj and the residual.
        return None if self.combine else super().kernel_weights()


class TPLinear(_ShardedLoad, Linear):
    def _load_local(self, rows: tuple[int, int], w: torch.Tensor) -> None:
        self.weight[rows[0] : rows[1]].copy_(w)


class TPQuantLinear(_ShardedLoad, QuantLinear):
    def _load_local(self, rows: tuple[int, int], w: torch.Tensor) -> None:
        QuantLinear.load_weight(self, rows, w)


def sharded_linear(old: nn.Module, out_local: int, rows: list, cols: tuple[int, int] | None,
                   combine: str = "") -> nn.Module:
    """A meta-device shard standing where ``old`` (Linear or QuantLinear, no bias) was."""
    full = (old.out_features, old.in_features)
    k = old.in_features if cols is None else cols[1] - cols[0]
    if isinstance(old, QuantLinear):
        g = old.group_size
        if old.mode == "int4" and cols is not None and (cols[0] % g or k % g):
            raise ValueError(f"int4 group size {g} must divide each rank's {k} input columns of a row-split "
                             f"projection ({full[1]} in all): use a smaller group or tensor parallel size")
        new = TPQuantLinear(k, out_local, old.mode, g, device="meta")
    else:
        if old.bias is not None:
            raise ValueError("tensor parallel projections with a bias are not supported (no released Qwen3-VL has one)")
        new = TPLinear(k, out_local, bias=False, device="meta", dtype=old.weight.dtype)
    new.full_shape, new.shard_rows, new.shard_cols, new.combine = full, rows, cols, combine
    return new


def shard_attention(attn: Attention, plan: ShardPlan) -> None:
    nh, nkv, hd = attn.nh, attn.nkv, attn.hd
    q0, q1 = plan.split(nh, "the number of attention heads")
    k0, k1 = plan.kv_heads(nh, nkv)
    nq, nk = q1 - q0, k1 - k0
    rows = [(q0 * hd, q1 * hd, 0), ((nh + k0) * hd, (nh + k1) * hd, nq * hd),
            ((nh + nkv + k0) * hd, (nh + nkv + k1) * hd, (nq + nk) * hd)]
    attn.qkv_proj = sharded_linear(attn.qkv_proj, (nq + 2 * nk) * hd, rows, None)
    hidden = attn.o_proj.out_features
    attn.o_proj = sharded_linear(attn.o_proj, hidden, [(0, hidden, 0)], (q0 * hd, q1 * hd), "sum")
    attn.nh, attn.nkv = nq, nk


def shard_mlp(mlp: MLP, plan: ShardPlan) -> None:
    i = mlp.intermediate
    a, b = plan.split(i, "the MLP intermediate size")
    mlp.gate_up_proj = sharded_linear(mlp.gate_up_proj, 2 * (b - a), [(a, b, 0), (i + a, i + b, b - a)], None)
    hidden = mlp.down_proj.out_features
    mlp.down_proj = sharded_linear(mlp.down_proj, hidden, [(0, hidden, 0)], (a, b), "sum")
    mlp.intermediate = b - a


def shard_head(head: nn.Module, plan: ShardPlan) -> nn.Module:
    """lm_head split by vocabulary: ceil(V / N) rows per rank (the last slice padded, trimmed
    after the gather)."""
    v = head.out_features
    n = -(-v // plan.world)
    lo, hi = plan.rank * n, min(v, (plan.rank + 1) * n)
    return sharded_linear(head, n, [(lo, hi, 0)], None, "gather")


class EmbeddingSink(nn.Module):
    """Stands where the token embedding was on ranks other than 0 (they receive embeddings from
    rank 0): takes the checkpoint's embedding table only to pass its rows on to a tied lm_head
    shard. Its empty ``weight`` (0, H) carries the model's dtype and device."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, tied: nn.Module | None):
        super().__init__()
        self.register_buffer("weight", torch.empty(0, hidden, dtype=dtype, device="meta"))
        self.logical_shape = (vocab, hidden)
        self.__dict__["tied"] = tied  # not a submodule: the head is the model's own lm_head

    def load_weight(self, rows: tuple[int, int] | None, w: torch.Tensor, expert: int | None = None) -> None:
        if self.tied is not None:
            self.tied.load_weight(rows, w)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("only rank 0 embeds tokens under tensor parallelism")


def local_text_config(cfg: TextConfig, plan: ShardPlan) -> TextConfig:
    """The text config as this rank's KV cache sees it (its KV heads only)."""
    k0, k1 = plan.kv_heads(cfg.num_attention_heads, cfg.num_key_value_heads)
    return dataclasses.replace(cfg, num_key_value_heads=k1 - k0)
