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
from ..kernels import HoldsOps, reference
from .cache_view import CacheView

# Every module that calls kernel ops holds ``ops`` (``qwen3vl.kernels.Ops``): the reference
# implementations until the model's ``select_kernels`` hands out the compiled ones chosen at load
# for its dtype and device (``use_ops``). Forwards call ``self.ops.<op>`` and never check.


class RMSNorm(HoldsOps, nn.Module):
    """Normalise in float32 and scale in the input dtype, exactly like the reference (see
    ``kernels.reference.rms_norm``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Linear(HoldsOps, nn.Linear):
    """nn.Linear with matrix-vector paths for decode on CPU, where a few activation rows meet
    every weight once and speed is how fast the weight streams from memory (``ops.linear``): the
    compiled bf16 kernel for up to ``kernel_rows()`` rows, else ``torch.mv`` for one bf16/fp16 row."""

    def use_ops(self, ops: kernels.Ops) -> None:
        w = self.weight  # the compiled kernel reads a contiguous bf16 CPU weight
        ok = w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous()
        self.ops = ops if ok else kernels.REFERENCE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)

    def kernel_rows(self) -> int:
        """Most activation rows ``forward`` gives the compiled kernel (0 without it)."""
        return self.ops.linear_rows(self.in_features)

    def kernel_weights(self) -> list[torch.Tensor] | None:
        """The weight as ``kernels.decode_layers`` takes it, or None when the layer does not run on
        the compiled kernels."""
        return [self.weight] if "linear" in self.ops.compiled and self.bias is None else None


@dataclass
class AttnContext:
    """What every layer's attention needs for one forward call (computed once per call).

    cos, sin:  (B, T, D) rotary tables for the new tokens.
    view:      the KV cache view of this call (``qwen3vl.model.cache_view``): where keys and values
               go, and the attention mask (None = plain causal over the new tokens only; for long
               prompts a ``CausalMask`` built block by block of query rows inside the attention op,
               so prefill memory is O(rows x context), never O(T x context)).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    view: CacheView

    @property
    def mask(self):  # (B, 1, T, L) bool, True = may attend (a tensor, a CausalMask, or None)
        return self.view.mask

    def __post_init__(self):
        # Per-head broadcast forms, built once per call rather than in every layer. With the first
        # half of sin negated, rotate_half(x) * sin == x.roll(D/2) * rot_sin exactly (negating a
        # factor is exact), one op where rotate_half takes four.
        half = self.sin.shape[-1] // 2
        self.cos_heads = self.cos[:, :, None, :]  # (B, T, 1, D)
        self.rot_sin_heads = torch.cat((-self.sin[..., :half], self.sin[..., half:]), -1)[:, :, None, :]


class Attention(HoldsOps, nn.Module):
    """Grouped-query attention with per-head q/k RMS norm and rotary embedding (``ops``: the fused
    q/k norm + rotary pass and the decode attention kernel for a few new tokens, in bf16 on CPU)."""

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
        qk = self.ops.rms_norm_rope(qk, self._qk_norm_weight(), self.q_norm.eps, ctx.cos_heads, ctx.rot_sin_heads)
        qk = qk.transpose(1, 2)  # (B, nh+nkv, T, D)
        q, k = qk.split((self.nh, self.nkv), dim=1)
        v = v.transpose(1, 2)  # (B, nkv, T, D)
        k, v = ctx.view.write(self.layer, k, v)  # (B, nkv, L, D)
        o = self.ops.attention(q, k, v, ctx.mask)  # (B, nh, T, D)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.nh * self.hd))


    def _qk_norm_weight(self) -> torch.Tensor:
        """(nh+nkv, D) per-head norm weights, rebuilt only when a weight changed (load, to())."""
        q, k = self.q_norm.weight, self.k_norm.weight
        if torch.is_grad_enabled() and q.requires_grad:  # training: rebuilt per call, gradients flow
            return torch.cat((q.expand(self.nh, self.hd), k.expand(self.nkv, self.hd)))
        # Inference-mode tensors cannot enter autograd-tracked calls, hence the mode in the key;
        # weights created under inference mode (a model loaded inside it) have no version counter.
        key = (q.data_ptr(), _version(q), k.data_ptr(), _version(k), q.dtype, torch.is_inference_mode_enabled())
        if getattr(self, "_qk_key", None) != key:
            self._qk_weight = torch.cat((q.detach().expand(self.nh, self.hd), k.detach().expand(self.nkv, self.hd)))
            self._qk_key = key
        return self._qk_weight


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


class MLP(HoldsOps, nn.Module):
    """SwiGLU with gate and up fused into one projection."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))  # [gate | up] -> silu(gate) * up


class SparseMoE(HoldsOps, nn.Module):
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

    def use_ops(self, ops: kernels.Ops) -> None:
        """At load: a single token's k experts in one compiled call per projection where the kernels
        take these experts (bf16 CPU stacks, or quantized experts on the compiled kernels), else
        one expert at a time (``_one_token``)."""
        self.ops = ops
        self.__dict__.pop("_one_token", None)
        w = self.gate_up_proj
        if isinstance(w, torch.Tensor):
            multi = "bf16_gemv_multi" in ops.compiled and all(
                p.dtype == torch.bfloat16 and p.device.type == "cpu" and p.is_contiguous()
                for p in (w, self.down_proj))
        else:  # quantized experts chose their kernels when they were packed (qwen3vl.quant)
            multi = ops is not kernels.REFERENCE and "int8_gemv_multi" in w.ops.compiled
        if multi:
            self._one_token = self._one_token_multi

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, H) -> weights (N, k) in x.dtype, experts (N, k)."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(x.dtype), experts

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of expert ``e``: (n, H) -> (n, H)."""
        return _expert_linear(self.down_proj, e, reference.silu_mul(_expert_linear(self.gate_up_proj, e, x)))

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
        ``torch.mv`` rather than ``F.linear``: on CPU its bf16 matrix-vector kernel streams these
        small (6 MB / 3 MB) expert matrices ~1.2-1.4x faster (measured at 30B-A3B shapes).
        ``use_ops`` may replace this with ``_one_token_multi``."""
        if not isinstance(self.gate_up_proj, torch.Tensor):  # quantized experts, stock kernels
            out = torch.zeros_like(x)
            for j, e in enumerate(experts.tolist()):
                out.add_(self.expert(e, x) * weights[j])
            return out
        v = x[0]  # (H,)
        out = torch.zeros_like(v)
        for j, e in enumerate(experts.tolist()):
            h = torch.mv(self.gate_up_proj[e], v)  # (2I,) = [gate | up]
            out.add_(torch.mv(self.down_proj[e], reference.silu_mul(h)) * weights[j])
        return out[None]  # (1, H)

    def _one_token_multi(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``_one_token`` with the compiled kernels: all k experts in one call per projection, no
        host sync at all."""
        h = self._experts_multi(self.gate_up_proj, x, experts)  # (k, 2I)
        y = self._experts_multi(self.down_proj, reference.silu_mul(h), experts)  # (k, H)
        return (y * weights[:, None]).sum(0, keepdim=True)  # (k, H) -> (1, H)

    def _experts_multi(self, w, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x (1 or k, K) @ the k ``experts``' matrices.T -> (k, N), one compiled-kernel call."""
        return self.ops.bf16_gemv_multi(x, w, experts) if isinstance(w, torch.Tensor) else w.linear_multi(x, experts)


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
            rows = ctx.view.decode_rows
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
        # layer.cpp calls the kernels behind these ops; the attention kernel takes head_dim % 32 == 0.
        norms_ops = (self.input_layernorm.ops, self.post_attention_layernorm.ops)
        if not (isinstance(m, MLP) and a.hd % 32 == 0 and {"rms_norm_rope", "attention"} <= a.ops.compiled
                and "silu_mul" in m.ops.compiled and all("rms_norm" in o.compiled for o in norms_ops)):
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
    cache slot, each row's cache index, attention end), the cache view's ``decode_rows``."""
    slot, pos, end = rows
    k_stack, v_stack = ctx.view.stacks()  # (layers, slots, Hkv, S, D) each
    return kernels.decode_layers(x, ctx.cos_heads, ctx.rot_sin_heads, k_stack, v_stack, slot, pos, end, ctx.mask,
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
            rows = ctx.view.decode_rows
            if rows is not None:
                return self.norm(_decode_step(h, ctx, rows, self._steps, self.norm.eps))
        for i, layer in enumerate(self.layers):
            h = layer(h, ctx)
            if i < len(deepstack):
                h[visual_mask] += deepstack[i].to(h.dtype)
        return self.norm(h)
