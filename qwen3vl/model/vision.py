"""Vision encoder (ViT) of Qwen3-VL: patch embedding, resampled position table, 2-D RoPE,
pre-LayerNorm blocks with attention restricted to one image / one video slice, the 2x2 merger
and the DeepStack mergers.

Input rows are flattened (C, T=2, 16, 16) patches already ordered in 2x2 merge windows
(the processor's job); everything here keeps that order.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..kernels import HoldsOps
from .rope import VisionRope


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride over one patch, i.e. a Linear over the flattened patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv3d(
            cfg.in_channels,
            cfg.hidden_size,
            kernel_size=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
            stride=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
            bias=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C*T*P*P) -> (N, hidden); a GEMM is much faster than Conv3d on CPU.
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


class VisionAttention(HoldsOps, nn.Module):
    """Attention within each image / video slice; q and k rotated by ``ops.vision_rope`` (compiled
    on CPU in bf16 and fp32, bit-identical to the reference: set at load, Qwen3VL.select_kernels)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)  # (N, 3, H, D)
        v = qkv[:, 2]
        # The reference rotates in float32 whatever the model dtype (cos, sin: (N, D) float32).
        q, k = self.ops.vision_rope(qkv, cos, sin)  # (N, H, D) each
        out = torch.empty_like(q)
        # Attention never crosses images or video slices. Segments of equal length are batched
        # into one SDPA call, so a video (all slices equal) or many same-size images cost one call;
        # when those segments are also adjacent, plain slicing replaces gather/scatter.
        for length, starts, span in segments:
            rows = slice(*span) if span is not None else (
                starts[:, None] + torch.arange(length, device=x.device)).reshape(-1)
            qs, ks, vs = (t[rows].view(-1, length, self.num_heads, self.head_dim).transpose(1, 2)
                          for t in (q, k, v))  # (S, H, L, D)
            o = F.scaled_dot_product_attention(qs, ks, vs)  # (S, H, L, D)
            out[rows] = o.transpose(1, 2).reshape(-1, self.num_heads, self.head_dim)
        return self.proj(out.reshape(n, -1))


class VisionMLP(HoldsOps, nn.Module):
    """fc1 -> GELU -> fc2; the tanh-GELU is ``ops.gelu`` (compiled in bf16 on CPU: the stock bf16
    one is ~4x slower)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.ops.gelu(self.linear_fc1(x), self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Group 2x2 neighbours (consecutive rows) and project to the text hidden size.

    The main merger normalises each patch before grouping; DeepStack mergers normalise the
    grouped 4*hidden vector (``post_shuffle_norm``).
    """

    def __init__(self, cfg: VisionConfig, post_shuffle_norm: bool):
        super().__init__()
        self.group = cfg.hidden_size * cfg.spatial_merge_size**2
        self.post_shuffle_norm = post_shuffle_norm
        self.norm = nn.LayerNorm(self.group if post_shuffle_norm else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.group, self.group, bias=True)
        self.linear_fc2 = nn.Linear(self.group, cfg.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, hidden) -> (N/4, out_hidden)
        x = self.norm(x.reshape(-1, self.group)) if self.post_shuffle_norm else self.norm(x).reshape(-1, self.group)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def merge_window_order(h: int, w: int, m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of each patch of an (h, w) grid listed in m x m merge-window order."""
    rows = torch.arange(h, device=device).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
    cols = torch.arange(w, device=device).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
    # (h/m, m, w/m, m) -> (h/m, w/m, m, m): window-major, then row-major inside a window.
    return rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.side = int(cfg.num_position_embeddings**0.5)
        self.rotary = VisionRope(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, post_shuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, post_shuffle_norm=True) for _ in cfg.deepstack_visual_indexes
        )

    def _position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Bilinear (align_corners=True) resampling of the square table to (h, w): (h*w, hidden),
        in merge-window order."""
        side, table = self.side, self.pos_embed.weight
        rows, cols = merge_window_order(h, w, self.cfg.spatial_merge_size, table.device)

        def taps(index: torch.Tensor, size: int):
            src = index.float() * (side - 1) / max(size - 1, 1)  # (n,) source coordinate
            lo = src.floor()
            frac = src - lo
            lo = lo.long()
            return lo, (lo + 1).clamp(max=side - 1), 1 - frac, frac

        r0, r1, wr0, wr1 = taps(rows, h)
        c0, c1, wc0, wc1 = taps(cols, w)
        idx = torch.stack((r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1), 1)  # (n, 4)
        wts = torch.stack((wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1), 1)  # (n, 4)
        # Weights stay float32, as in the reference, which sums (table[idx] * wts[..., None]) over
        # the 4 taps: the same products added in the same order, without its (n, 4, hidden)
        # float32 temporaries (40 ms for a 448x448 image, mostly page faults; now ~3 ms). The
        # caller casts the sum.
        out = table.index_select(0, idx[:, 0]).float() * wts[:, 0:1]
        for j in range(1, 4):
            out += table.index_select(0, idx[:, j]).float() * wts[:, j : j + 1]
        return out  # (n, hidden) float32

    def _layout(self, grid_thw: torch.Tensor, device):
        """Per-patch position embeddings, RoPE row/col indices and attention segments."""
        m = self.cfg.spatial_merge_size
        pos, rows, cols, seg = [], [], [], defaultdict(list)
        start = 0
        for t, h, w in grid_thw.tolist():
            pe = self._position_embedding(h, w)
            r, c = merge_window_order(h, w, m, device)
            pos.append(pe.repeat(t, 1))
            rows.append(r.repeat(t))
            cols.append(c.repeat(t))
            for _ in range(t):  # one attention segment per image / per video slice
                seg[h * w].append(start)
                start += h * w
        segments = []
        for length, st in seg.items():
            adjacent = all(b - a == length for a, b in zip(st, st[1:]))
            span = (st[0], st[-1] + length) if adjacent else None
            segments.append((length, torch.tensor(st, device=device), span))
        return torch.cat(pos), torch.cat(rows), torch.cat(cols), segments

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """pixel_values: (N, C*T*P*P); grid_thw: (num_items, 3) ->
        (merged (N/4, out_hidden), [deepstack features (N/4, out_hidden)] per deepstack index)."""
        dtype, device = self.pos_embed.weight.dtype, self.pos_embed.weight.device
        x = self.patch_embed(pixel_values.to(device=device, dtype=dtype))  # (N, hidden)
        if x.shape[0] != int(grid_thw.prod(-1).sum()):
            raise ValueError(
                f"pixel rows ({x.shape[0]}) do not match the grids {grid_thw.tolist()} "
                f"(which need {int(grid_thw.prod(-1).sum())})"
            )
        pos, rows, cols, segments = self._layout(grid_thw, device)
        x = x + pos.to(dtype)
        cos, sin = self.rotary(rows, cols)  # (N, D) float32
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, segments)
            if i in self.cfg.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        return self.merger(x), deepstack
