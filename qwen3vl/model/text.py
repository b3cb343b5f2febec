"""Text decoder of Qwen3-VL (Qwen3 layers), dense or mixture-of-experts per layer.

Layers: RMSNorm pre-norm; attention with per-head RMSNorm on q and k before MRoPE and
grouped-query attention; SwiGLU MLP or a sparse MoE block; DeepStack visual features are added
at the visual token positions right after the first ``len(deepstack)`` layers.

The released checkpoint keeps q/k/v and gate/up as separate tensors; here they are fused at load
time (``qkv_proj``, ``gate_up_proj``) so each costs one GEMM (the name table in ``weights.py``
maps checkpoint slices onto the fused parameters).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32 and scale in the input dtype, exactly like the reference. ``weight``
    is (D,) or per head (heads, D)."""
    if x.dtype == torch.float32 and weight.dim() == 1:  # the fused kernel is bit-identical in fp32
        return F.rms_norm(x, weight.shape, weight, eps)
    if x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" and kernels.available():
        # The compiled one-pass version (same arithmetic, sums in another order): decode pays
        # ~10 ops' fixed costs otherwise, prefill three passes over fp32 copies.
        return kernels.rms_norm_bf16(x, weight, eps)
    # Normalised by the fused fp32 kernel (bit-identical to x * rsqrt(mean(x^2) + eps), fewer
    # ops: decode of small models is per-op overhead), rounded to x's dtype, then scaled.
    return weight * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear with matrix-vector paths for decode on CPU, where a few activation rows meet
    every weight once and speed is how fast the weight streams from memory: the compiled bf16
    kernel (``qwen3vl.kernels``) for up to 4 rows, else ``torch.mv`` for one bf16/fp16 row (27
    vs 21 GB/s for the GEMM path on a 2B-shaped stack). ``use_kernels`` is set at load."""

    use_kernels = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= 4 and self.bias is None and x.device.type == "cpu" and x.dtype != torch.float32:
            if self.use_kernels and x.dtype == torch.bfloat16 and rows <= self.kernel_rows():
                return kernels.bf16_gemv(x.reshape(rows, -1), self.weight).view(*x.shape[:-1], self.out_features)
            if rows == 1:
                return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def kernel_rows(self) -> int:
        """Most activation rows ``forward`` gives the compiled kernel (with ``use_kernels``): for
        narrow inputs (the tiny test model) the GEMM wins from 3 rows."""
        return 4 if self.in_features >= 256 else 2

    def kernel_weights(self) -> list[torch.Tensor] | None:
        """The weight as ``kernels.decode_layers`` takes it, or None when the layer does not run on
        the compiled kernels."""
        return [self.weight] if self.use_kernels and self.bias is None else None


@dataclass
class AttnContext:
    """What every layer's attention needs for one forward call (computed once per call).

    cos, sin:  (B, T, D) rotary tables for the new tokens.
    mask:      (B, 1, T, L) bool, True = may attend; None = plain causal over new tokens only.
    cache:     a KV cache exposing ``write(layer, k, v) -> (k_all, v_all)`` or None.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    cache: object | None = None

    def __post_init__(self):
        # Per-head broadcast forms, built once per call rather than in every layer. With the first
        # half of sin negated, rotate_half(x) * sin == x.roll(D/2) * rot_sin exactly (negating a
        # factor is exact), one op where rotate_half takes four.
        half = self.sin.shape[-1] // 2
        self.cos_heads = self.cos[:, :, None, :]  # (B, T, 1, D)
        self.rot_sin_heads = torch.cat((-self.sin[..., :half], self.sin[..., half:]), -1)[:, :, None, :]


class Attention(nn.Module):
    # bf16 on CPU with the compiled kernels (set at load, Qwen3VL.select_kernels): the fused q/k
    # norm + rotary pass, and the decode attention kernel for a few new tokens.
    cpu_kernels = False

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.attention_bias)
        self.o_proj = Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv_proj(x).view(b, t, self.nh + 2 * self.nkv, self.hd)
        qk, v = qkv.split((self.nh + self.nkv, self.nkv), dim=2)  # (B, T, nh+nkv, D), (B, T, nkv, D)
        # q and k heads normalised and rotated in one pass: per head this is exactly q_norm / k_norm
        # followed by the rotation, with half the kernel launches.
        fused = self.cpu_kernels and qk.dtype == torch.bfloat16 and qk.device.type == "cpu"
        if fused:  # the same arithmetic in one compiled pass
            qk = kernels.rms_norm_rope_bf16(qk, self._qk_norm_weight(), self.q_norm.eps, ctx.cos_heads,
                                            ctx.rot_sin_heads)
        else:
            qk = rms_norm(qk, self._qk_norm_weight(), self.q_norm.eps)
            qk = qk * ctx.cos_heads + qk.roll(self.hd // 2, -1) * ctx.rot_sin_heads  # apply_rotary, see AttnContext
        qk = qk.transpose(1, 2)  # (B, nh+nkv, T, D)
        q, k = qk.split((self.nh, self.nkv), dim=1)
        v = v.transpose(1, 2)  # (B, nkv, T, D)
        if ctx.cache is not None:
            k, v = ctx.cache.write(self.layer, k, v)  # (B, nkv, L, D)
        if fused and t <= 4 and (t == 1 or ctx.mask is not None):
            o = kernels.decode_attention(q, k, v, ctx.mask)  # (B, nh, T, D)
        elif ctx.mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=self.nkv != self.nh)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=self.nkv != self.nh)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.nh * self.hd))


    def _qk_norm_weight(self) -> torch.Tensor:
        """(nh+nkv, D) per-head norm weights, rebuilt only when a weight changed (load, to())."""
        q, k = self.q_norm.weight, self.k_norm.weight
        # Inference-mode tensors cannot enter autograd-tracked calls, hence the mode in the key;
        # weights created under inference mode (a model loaded inside it) have no version counter.
        key = (q.data_ptr(), _version(q), k.data_ptr(), _version(k), q.dtype, torch.is_inference_mode_enabled())
        if getattr(self, "_qk_key", None) != key:
            self._qk_weight = torch.cat((q.detach().expand(self.nh, self.hd), k.detach().expand(self.nkv, self.hd)))
            self._qk_key = key
        return self._qk_weight


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


class MLP(nn.Module):
    """SwiGLU with gate and up fused into one projection."""

    cpu_kernels = False  # bf16 on CPU with the compiled kernels: set at load (Qwen3VL.select_kernels)

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up_proj(x)
        if self.cpu_kernels and gu.dtype == torch.bfloat16 and gu.device.type == "cpu":
            return self.down_proj(kernels.silu_mul_bf16(gu))  # one compiled pass, same rounding
        gate, up = gu.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoE(nn.Module):
    """Router -> softmax (float32) -> top-k -> (renormalise) -> SwiGLU experts.

    Expert weights are kept as (E, 2I, H) and (E, H, I) so each expert is a plain ``F.linear``
    on a view (no copy of expert weights is ever made). Tokens are grouped by expert with one
    sort, so the Python loop runs over the experts that were hit, never over tokens; a single
    token (batch-1 decode) skips the sort and reads only its k experts' weights.
    ``gate_up_proj`` / ``down_proj`` may be replaced by quantized stacks at load
    (``qwen3vl.quant.QuantExperts``, same (E, N, K) view per expert).

    ``norm_topk_prob`` is honoured; the reference renormalises whatever the flag says (every
    released Qwen3-VL MoE config sets it to true, where the two agree).
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.top_k, self.intermediate, self.norm_topk = cfg.num_experts_per_tok, i, cfg.norm_topk_prob
        self.gate = Linear(h, e, bias=False)  # router; bf16 decode uses the compiled kernel too
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.last_expert_counts: torch.Tensor | None = None  # (E,) tokens routed, for inspection
        # Set at load (Qwen3VL.select_kernels) when the compiled kernels can run a token's k experts
        # in one call (bf16 or quantized CPU experts).
        self.multi_kernels = False

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, H) -> weights (N, k) in x.dtype, experts (N, k)."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(x.dtype), experts

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of expert ``e``: (n, H) -> (n, H)."""
        gate, up = _expert_linear(self.gate_up_proj, e, x).split(self.intermediate, dim=-1)
        return _expert_linear(self.down_proj, e, F.silu(gate) * up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        weights, experts = self.route(x)  # (N, k)
        flat = experts.reshape(-1)  # (N*k,)
        self.last_expert_counts = torch.bincount(flat, minlength=self.gate.out_features)  # (E,)
        if x.shape[0] == 1:
            return self._one_token(x, weights[0], flat).reshape(shape)
        order = flat.argsort(stable=True)
        token_of = order // self.top_k  # (N*k,) token index for each sorted assignment
        w_sorted = weights.reshape(-1)[order, None]  # (N*k, 1)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(self.last_expert_counts.tolist()):
            if n == 0:
                continue
            tok = token_of[start : start + n]
            out.index_add_(0, tok, self.expert(e, x[tok]) * w_sorted[start : start + n])
            start += n
        return out.reshape(shape)

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x: (1, H), weights/experts: (k,). The k experts in routing order, accumulated in place;
        one host sync (``tolist``) for the k indices, no sort, no gather (copy) of weights.
        With the compiled kernels (bf16 or quantized CPU experts) all k experts run in one call
        per projection and there is no host sync at all. Otherwise ``torch.mv`` rather than
        ``F.linear``: on CPU its bf16 matrix-vector kernel streams these small (6 MB / 3 MB)
        expert matrices ~1.2-1.4x faster (measured at 30B-A3B shapes)."""
        if self.multi_kernels:  # all k experts in one kernel call per projection, no host sync
            h = _experts_multi(self.gate_up_proj, x, experts)  # (k, 2I)
            y = _experts_multi(self.down_proj, F.silu(h[:, : self.intermediate]) * h[:, self.intermediate :], experts)
            return (y * weights[:, None]).sum(0, keepdim=True)  # (k, H) -> (1, H)
        if not isinstance(self.gate_up_proj, torch.Tensor):  # quantized experts, stock kernels
            out = torch.zeros_like(x)
            for j, e in enumerate(experts.tolist()):
                out.add_(self.expert(e, x) * weights[j])
            return out
        v = x[0]  # (H,)
        out = torch.zeros_like(v)
        for j, e in enumerate(experts.tolist()):
            gate, up = torch.mv(self.gate_up_proj[e], v).split(self.intermediate)  # (I,), (I,)
            out.add_(torch.mv(self.down_proj[e], F.silu(gate) * up) * weights[j])
        return out[None]  # (1, H)


def _experts_multi(w, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """x (1 or k, K) @ the k ``experts``' matrices.T -> (k, N), one compiled-kernel call."""
    return kernels.bf16_gemv_multi(x, w, experts) if isinstance(w, torch.Tensor) else w.linear_multi(x, experts)


def _expert_linear(w, e: int, x: torch.Tensor) -> torch.Tensor:
    """x (n, K) @ expert e's (N, K) matrix.T: a stacked (E, N, K) parameter, or quantized
    experts (``qwen3vl.quant.QuantExperts``) that stand in its place."""
    return F.linear(x, w[e]) if isinstance(w, torch.Tensor) else w.linear(e, x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = SparseMoE(cfg) if cfg.is_sparse_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # This layer's arguments to kernels.decode_layers: set at load (enable_step_kernel), dropped
        # when the weights move (_apply).
        self._step: StepArgs | None = None

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if self._step is not None and x.shape[1] == 1 and x.shape[0] <= self._step.rows:
            rows = getattr(ctx.cache, "decode_rows", None)
            if rows is not None:
                return _decode_step(x, ctx, rows, self._step, self.input_layernorm.eps)
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def enable_step_kernel(self) -> bool:
        """Let decode (one new token per row, as many rows as every projection gives the compiled
        kernels) run this layer in the compiled one-call step (``kernels.decode_layers``: the same
        kernels in the same order, bit-identical) when every part of it already runs on the
        compiled CPU kernels: a dense MLP, bf16 activations, bf16 or quantized projections."""
        a, m = self.self_attn, self.mlp
        self._step = None
        if not (isinstance(m, MLP) and a.cpu_kernels and m.cpu_kernels and kernels.available()):
            return False
        linears = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
        weights = [lin.kernel_weights() for lin in linears]
        if any(w is None for w in weights):
            return False
        norms = [self.input_layernorm.weight, a.q_norm.weight, a.k_norm.weight, self.post_attention_layernorm.weight]
        group = max(getattr(lin, "group_size", 0) for lin in linears)
        rows = min(lin.kernel_rows() for lin in linears)
        self._step = StepArgs(norms + [t for w in weights for t in w], [a.layer] + [len(w) for w in weights], group,
                              rows)
        return True

    def _apply(self, fn, *args, **kwargs):
        self._step = None  # moved or converted weights: back to the module path
        return super()._apply(fn, *args, **kwargs)


class StepArgs(NamedTuple):
    """Layers' weights as ``kernels.decode_layers`` takes them."""

    tensors: list[torch.Tensor]  # per layer: norms, then the projections' tensors
    layout: list[int]  # per layer: cache layer index, tensors of q/k/v, o, gate/up, down
    group_size: int  # int4 group size (0: none)
    rows: int  # most sequences per call: what every projection gives the compiled kernels


def _decode_step(x: torch.Tensor, ctx: AttnContext, rows: tuple, step: StepArgs, eps: float) -> torch.Tensor:
    """x (B, 1, H): one token per row through the layers of ``step`` in one call. ``rows`` = (first
    cache slot, each row's cache index, attention end), the cache window's ``decode_rows``."""
    slot, pos, end = rows
    cache = ctx.cache.cache
    return kernels.decode_layers(x, ctx.cos_heads, ctx.rot_sin_heads, cache.k, cache.v, slot, pos, end, ctx.mask,
                                 step.tensors, step.layout, eps, step.group_size)


class TextDecoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._steps: StepArgs | None = None  # every layer's decode step in one call (enable_step_kernels)

    def enable_step_kernels(self) -> None:
        """Decode: each dense layer on the compiled kernels in one call, and the whole stack in one
        call when every layer qualifies (``DecoderLayer.enable_step_kernel``)."""
        enabled = [layer.enable_step_kernel() for layer in self.layers]
        self._steps = None
        if all(enabled):
            steps = [layer._step for layer in self.layers]
            self._steps = StepArgs([t for s in steps for t in s.tensors], [n for s in steps for n in s.layout],
                                   steps[0].group_size, min(s.rows for s in steps))

    def _apply(self, fn, *args, **kwargs):
        self._steps = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, h: torch.Tensor, ctx: AttnContext, visual_mask=None, deepstack=()) -> torch.Tensor:
        """h: (B, T, H) input embeddings -> (B, T, H) final-normed hidden states.

        visual_mask: (B, T) bool, where the deepstack features (each (n_visual, H)) are added.
        """
        if self._steps is not None and h.shape[1] == 1 and h.shape[0] <= self._steps.rows and not deepstack:
            rows = getattr(ctx.cache, "decode_rows", None)
            if rows is not None:
                return self.norm(_decode_step(h, ctx, rows, self._steps, self.norm.eps))
        for i, layer in enumerate(self.layers):
            h = layer(h, ctx)
            if i < len(deepstack):
                h[visual_mask] += deepstack[i].to(h.dtype)
        return self.norm(h)
