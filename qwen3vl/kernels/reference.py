"""The one reference implementation of each kernel op, in plain PyTorch (any dtype, any device).

These are what the model computes without the compiled kernels (fp32 models, other devices,
QWEN3VL_NO_EXT=1, CPUs without AVX-512 BF16) and the definitions the compiled kernels are tested
against. Each keeps the rounding order of the model it reproduces: fp32 in, fp32 out; bf16 ops
round where the separate bf16 PyTorch ops round.

Quantized formats (``qwen3vl.quant``): int8 ``w = q * scale`` (scales (N, 1) fp32); int4
``w = (code - 8) * scale + zero`` with codes as nibble pairs (N, K/2) uint8, even k in the low
nibble, scales/zeros (N, K/G) bf16. Their weights are defined in fp32 (``int8_weight``,
``int4_weight``) and dequantized to bf16 with one rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- pointwise


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm of x (..., D) with weight (D,), or per head: x (..., heads, D), weight (heads, D).
    fp32 with one weight: the fused kernel (bit-identical to x * rsqrt(mean(x^2) + eps) * w, fewer
    ops: decode of small models is per-op overhead). Otherwise normalised in fp32, rounded to x's
    dtype, then scaled, as the reference model does."""
    if x.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                  rot_sin: torch.Tensor) -> torch.Tensor:
    """Per-head RMS norm, then the rotary embedding, of x (B, T, heads, D) with weight (heads, D)
    and cos, rot_sin (B, T, 1, D), rot_sin being sin with its first half negated: then
    rotate_half(n) * sin == n.roll(D/2) * rot_sin exactly (negating a factor is exact), one op
    where rotate_half takes four."""
    n = rms_norm(x, weight, eps)
    return n * cos + n.roll(x.shape[-1] // 2, -1) * rot_sin


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: x (..., 2I) = [gate | up] -> silu(gate) * up (..., I)."""
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., D); cos/sin broadcastable to x, same dtype as x."""
    return x * cos + rotate_half(x) * sin


def vision_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of the vision encoder's q and k in qkv (N, 3, H, D) with float32 cos, sin
    (N, D): (q, k), each (N, H, D) in qkv's dtype, rotated in fp32 whatever the model dtype (as
    the reference encoder does) and rounded once."""
    c, s = cos[:, None, :], sin[:, None, :]
    return tuple(apply_rotary(qkv[:, i].float(), c, s).to(qkv.dtype) for i in (0, 1))


# ----------------------------------------------------------------------------- attention


# Query rows x keys of one masked SDPA call: SDPA turns a bool mask into a float one of that size
# (and the math path keeps scores of that size), so masked attention runs in blocks of query rows
# and its memory stays O(rows x context) instead of O(T x context): 2^24 = 64 MB of fp32 per block.
ATTENTION_BLOCK = 1 << 24


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q (B, H, T, D) over k/v (B, Hkv, L, D) (H a multiple of Hkv: grouped heads) -> (B, H, T, D).
    mask (B, 1, T, L) bool, True = may attend, or an object whose ``rows(start, stop)`` builds that
    tensor's rows (``qwen3vl.model.cache_view.CausalMask``, for long prompts); None = causal over
    the new tokens (T == L, or one token attending to every key: SDPA's causal kernel, O(T) memory).
    With a mask, blocks of at most ``ATTENTION_BLOCK / L`` query rows per call; each query row's
    result does not depend on the others, so blocks give the one-call values."""
    gqa = k.shape[1] != q.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    b, h, t, _ = q.shape
    rows = max(1, ATTENTION_BLOCK // k.shape[2])
    if t <= rows and isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    out = q.new_empty(b, t, h, v.shape[-1]).transpose(1, 2)  # (B, H, T, D), heads-inner like SDPA's
    for start in range(0, t, rows):
        stop = min(start + rows, t)
        block = mask[:, :, start:stop] if isinstance(mask, torch.Tensor) else mask.rows(start, stop)
        out[:, :, start:stop] = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=block,
                                                               enable_gqa=gqa)
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """A few new tokens q (B, H, T, D) over every key of k/v (B, Hkv, L, D) where mask (B, 1, T, L)
    allows (everywhere when None): SDPA."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


# ----------------------------------------------------------------------------- linear layers


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """nn.Linear; one bf16/fp16 activation row on CPU takes ``torch.mv``, whose matrix-vector
    kernel streams the weight faster than the GEMM path (27 vs 21 GB/s on a 2B-shaped stack)."""
    if x.numel() == x.shape[-1] and bias is None and x.device.type == "cpu" and x.dtype != torch.float32:
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def linear_rows(in_features: int) -> int:
    """Most activation rows ``linear`` gives a compiled matrix-vector kernel: none here."""
    return 0


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32/bf16 @ weight (N, K) bf16 .T -> (M, N) in x's dtype, in fp32."""
    return (x.float() @ weight.float().t()).to(x.dtype)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ the int8 weight .T -> (M, N) in x's dtype, in fp32 with exact activations."""
    return (x.float() @ int8_weight(qweight, scales).t()).to(x.dtype)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> torch.Tensor:
    return (x.float() @ int4_weight(qweight, scales, zeros, group_size).t()).to(x.dtype)


def bf16_gemv_multi(x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row j of x (or its single row) @ matrix idx[j] of the stack (E, N, K) .T -> (J, N)."""
    return _multi(x, idx, lambda e: weight[e].float())


def int8_gemv_multi(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return _multi(x, idx, lambda e: int8_weight(qweight[e], scales[e]))


def int4_gemv_multi(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, idx: torch.Tensor) -> torch.Tensor:
    return _multi(x, idx, lambda e: int4_weight(qweight[e], scales[e], zeros[e], group_size))


def _multi(x: torch.Tensor, idx: torch.Tensor, weight) -> torch.Tensor:
    xs = x.float().expand(len(idx), -1)
    return torch.stack([xs[j] @ weight(e).t() for j, e in enumerate(idx.tolist())]).to(x.dtype)


# ----------------------------------------------------------------------------- quantized weights


def int8_weight(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The int8 format's (N, K) weight in float32."""
    return qweight.float() * scales.view(-1, 1)


def int4_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The int4 format's (N, K) weight in float32 ((code - 8) * scale is exact in fp32)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    codes = torch.stack((qweight & 0xF, qweight >> 4), -1).view(n, k // group_size, group_size).float()
    return ((codes - 8) * scales.float()[..., None] + zeros.float()[..., None]).view(n, k)  # (N, K/G, G) -> (N, K)


def int8_dequant(qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, K) bf16 weight: fp32 arithmetic, one rounding; written into ``out`` when given."""
    return _into(int8_weight(qweight, scales), out)


def int4_dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    return _into(int4_weight(qweight, scales, zeros, group_size), out)


def _into(w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return w.to(torch.bfloat16) if out is None else out.copy_(w)
