"""The compiled kernels (``torch.ops.qwen3vl_kernels``, see ``build``) behind the ops' signatures
of ``reference``. Valid once ``build()`` succeeded; ``select`` hands them out only then, and only
for inputs they take (CPU; bf16 for most; the quantized products and the vision rotary pass also
fp32). Where a kernel covers some shapes only (few activation rows, a few decode tokens), the
function passes the others on to the reference.

Sources: gemv.cpp (bf16/int8/int4 matrix-vector products and their *_multi variants, shared
parts in gemv.h and vnni.h), amx.cpp (AMX tile paths for 5-8 rows), dequant.cpp, attention.cpp
(decode attention), pointwise.cpp (norms, rotary embeddings, activations), layer.cpp (the
one-call decode step over dense layers, from the other kernels).
"""
from __future__ import annotations

import torch

from . import reference


def _k():
    return torch.ops.qwen3vl_kernels


# ----------------------------------------------------------------------------- pointwise (bf16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """bf16 x (..., D), weight (W, D): row r of x uses weight row r % W. The reference's arithmetic
    in one pass (sums in another order; rows split across threads when large): decode pays ~10
    ops' fixed costs otherwise, prefill three passes over fp32 copies."""
    return _k().rms_norm_bf16(x, weight, eps)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                  rot_sin: torch.Tensor) -> torch.Tensor:
    """bf16, heads contiguous; rounded after each step exactly as the separate bf16 ops are."""
    return _k().rms_norm_rope_bf16(x, weight, eps, cos, rot_sin)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """bf16, one pass, rounded like the separate ops."""
    return _k().silu_mul_bf16(x)


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """bf16 tanh-GELU in one pass (fp32 inside; the stock bf16 kernel is ~4x slower and agrees to
    fp32 rounding before the bf16 rounding); the exact GELU stays stock."""
    return _k().gelu_tanh_bf16(x) if approximate == "tanh" else reference.gelu(x, approximate)


def vision_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 or fp32, D contiguous; bit-identical to the reference (no fused multiply-add)."""
    out = _k().vision_rope(qkv, cos, sin)
    return out[0], out[1]


# ----------------------------------------------------------------------------- attention (bf16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Up to 4 new tokens (one, or several with a mask) with D % 32 == 0 take the decode kernel,
    where SDPA's fixed cost per call is several times the work; the rest SDPA."""
    t = q.shape[2]
    if t <= 4 and (t == 1 or isinstance(mask, torch.Tensor)) and q.shape[-1] % 32 == 0:
        return decode_attention(q, k, v, mask)
    return reference.attention(q, k, v, mask)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 q (B, H, T, D), k/v (B, Hkv, L, D) -> (B, H, T, D), a view of a (B, T, H, D) tensor.
    Scores and softmax in fp32."""
    return _k().decode_attention(q, k, v, mask, q.shape[-1] ** -0.5)


# ----------------------------------------------------------------------------- linear layers


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 x and contiguous bf16 weight: up to ``linear_rows`` activation rows take the
    matrix-vector kernel (reads each weight once for all rows), others the reference."""
    rows = x.numel() // x.shape[-1]
    if bias is None and rows <= linear_rows(weight.shape[1]):
        return bf16_gemv(x.reshape(rows, -1), weight).view(*x.shape[:-1], weight.shape[0])
    return reference.linear(x, weight, bias)


def linear_rows(in_features: int) -> int:
    """Most activation rows ``linear`` gives the kernel: for narrow inputs (the tiny test model)
    the GEMM wins from 3 rows."""
    return 4 if in_features >= 256 else 2


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32/bf16 @ weight (N, K) bf16 .T -> (M, N) in x's dtype (fp32 x: hi + lo bf16 parts)."""
    return _k().bf16_gemv(x, weight)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Activations rounded to int16 per row (error <= 2^-16 of its max), integer dot products."""
    return _k().int8_gemv(x, qweight, scales)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """Activations rounded to int8 per block of 128 (error <= 1/254 of the block's max)."""
    return _k().int4_gemv(x, qweight, scales, zeros, group_size)


def bf16_gemv_multi(x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return _k().bf16_gemv_multi(x, weight, idx)


def int8_gemv_multi(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return _k().int8_gemv_multi(x, qweight, scales, idx)


def int4_gemv_multi(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, idx: torch.Tensor) -> torch.Tensor:
    return _k().int4_gemv_multi(x, qweight, scales, zeros, group_size, idx)


def int8_dequant(qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's bf16 weight (fp32 arithmetic, one rounding) in one fused pass, ~10x the
    speed of the elementwise ops; into ``out`` when given (reuse it: fresh memory per call costs
    more in page faults than the conversion)."""
    if out is None:
        out = torch.empty(qweight.shape, dtype=torch.bfloat16, device=qweight.device)
    _k().int8_dequant(qweight, scales, out)
    return out


def int4_dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """As ``int8_dequant`` (within one bf16 unit of the reference: the -8 offset is folded into
    the zero point)."""
    if out is None:
        out = torch.empty(qweight.shape[0], qweight.shape[1] * 2, dtype=torch.bfloat16, device=qweight.device)
    _k().int4_dequant(qweight, scales, zeros, group_size, out)
    return out


# ----------------------------------------------------------------------------- whole layers, AMX


def decode_layers(x: torch.Tensor, cos: torch.Tensor, rot_sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot: int, pos: list[int], end: int, mask: torch.Tensor | None,
                  weights: list[torch.Tensor], layout: list[int], eps: float, group_size: int) -> torch.Tensor:
    """Dense decoder layers for one new token per row, x (B, 1, H) bf16 -> (B, 1, H), in one call
    (layer.cpp): the kernels above in the order ``DecoderLayer.forward`` calls them, so
    bit-identical to it. Per layer, ``layout`` holds (cache layer index, number of tensors of
    q/k/v, o, gate/up, down) and ``weights`` its input norm, q_norm, k_norm and post-attention norm
    weights, then the projections: [weight] (bf16), [qweight, scales] (int8), [qweight, scales,
    zeros] (int4, ``group_size``) or bf16 parts [w0, w1(, w2)] (a split projection, outputs
    concatenated). Row b is cache slot ``slot + b`` of k_cache / v_cache (layers,
    slots, Hkv, S, D): its key and value go to index ``pos[b]`` and it attends to [0, end) where
    ``mask`` (B, 1, 1, end) bool allows (everywhere when None). No reference: the layers' own
    forward is the fallback."""
    return _k().decode_layers(x, cos, rot_sin, k_cache, v_cache, slot, pos, end, mask, weights, layout, eps,
                              group_size)


def amx(enable: bool | None = None) -> bool:
    """Whether ``int8_gemv`` / ``int4_gemv`` use AMX tiles for 5-8 activation rows (CPUs with
    AMX-INT8, when the OS grants the tile state); ``enable`` switches it (tests compare both
    paths). Same products and scaling as the VNNI kernels, summed in another order."""
    return bool(_k().amx(-1 if enable is None else int(enable)))
