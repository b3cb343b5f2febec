"""AVX-512 kernels for CPU decode and prefill, compiled on first use (gemv.cpp: matrix-vector
products, dequantization, decode attention; pointwise.cpp: norms, rotary embeddings, activations;
layer.cpp: dense decoder layers for one decode token per sequence in one call, from the other two).

Decode multiplies a few activation rows by every weight matrix, so it is bound by how fast the
weights stream from memory; these kernels read each weight once for all rows and stream int8/int4
weights at ~20-22 GB/s on a 2-core ~30 GB/s Xeon, where the stock kernels reach ~14-15 GB/s. The extension is built
with the system C++ compiler into ``$QWEN3VL_HOME/torch_extensions`` (default
``~/.cache/qwen3vl``), keyed by source, torch version and CPU, and loaded as
``torch.ops.qwen3vl_kernels``. ``available()`` is False (and callers keep the stock kernels) when
QWEN3VL_NO_EXT=1, the CPU lacks AVX-512 BF16, or the compiler/headers are missing or the build
fails; the reason is printed once to stderr, as is the build time.

Entry points take x (M, K) float32 or bfloat16 and return (M, N) in x's dtype:
  * ``int8_gemv(x, qweight (N, K) int8, scales (N, 1) float32)``
  * ``int4_gemv(x, qweight (N, K/2) uint8 nibble pairs, scales, zeros (N, K/G) bfloat16, G)``
    with w = (code - 8) * scale + zero, even k in the low nibble
Both quantized kernels use integer dot products (AVX-512 VNNI) on quantized activations: int8
rounds each activation row to int16 (one scale per row, error <= 2^-16 of its max), int4 to int8
per block of 128 (error <= 1/254 of the block's max, small next to the 4-bit weights' own). With
5-8 activation rows both use AMX tiles where the CPU and OS allow (same products and scaling,
summed in another order; int8 splits each int16 activation into two bytes; see ``amx``).
  * ``bf16_gemv(x, weight (N, K) bfloat16)``
  * ``rms_norm_bf16``, ``rms_norm_rope_bf16``, ``silu_mul_bf16``, ``gelu_tanh_bf16``,
    ``vision_rope``: RMS norm, q/k norm + rotary embedding, SwiGLU, tanh-GELU and the vision
    rotary embedding in one pass each, for decode (several eager ops of ~10-20 us fixed cost) and
    prefill (several passes over full-size temporaries; rows split across threads)
  * ``decode_attention(q, k, v, mask)``: a few new tokens' attention over the KV cache (bf16),
    where SDPA's fixed cost per call is several times the work
  * ``*_gemv_multi(x, stacked weights (E, N, ...), ..., idx (J,) int64)`` -> (J, N): row j (or the
    single row of x) times matrix idx[j], for a MoE token's k experts in one call
and, for prefill GEMMs, ``int8_dequant(qweight, scales)`` / ``int4_dequant(qweight, scales,
zeros, G)`` -> the (N, K) bfloat16 weight (fp32 arithmetic, one rounding).
Without the extension they fall back to plain PyTorch (dequantize + matmul), for tests.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time

import torch

_DIR = os.path.dirname(__file__)
_SOURCES = [os.path.join(_DIR, name) for name in ("gemv.cpp", "pointwise.cpp", "layer.cpp")]
_HEADERS = [os.path.join(_DIR, "simd.h")]
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")
_state: dict = {}


def _cpu_flags() -> tuple[str, str]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; empty strings elsewhere."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags":
                    flags = value.strip()
                    break
    except OSError:
        pass
    return model, flags


def _build_dir(source: bytes, model: str, flags: str) -> str:
    """Build folder for this source, torch, Python and CPU: -march=native code is only valid on
    the CPU it was built for."""
    key = hashlib.sha256(b"\0".join([source, torch.__version__.encode(), sys.version.encode(), model.encode(),
                                     flags.encode()])).hexdigest()[:16]
    home = os.environ.get("QWEN3VL_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "qwen3vl")
    return os.path.join(home, "torch_extensions", f"qwen3vl_kernels_{key}")


def _build():
    """Returns None when loaded, else the reason it is not."""
    if os.environ.get("QWEN3VL_NO_EXT") == "1":
        return "QWEN3VL_NO_EXT=1"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"no kernels for {platform.machine()}"
    model, flags = _cpu_flags()
    missing = [f for f in _REQUIRED_FLAGS if f not in flags.split()]
    if missing:
        return "CPU lacks " + ", ".join(missing)
    try:
        from torch.utils import cpp_extension
    except ImportError as e:  # stripped-down torch builds
        return f"torch.utils.cpp_extension unavailable ({e})"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx})"
    if not os.path.exists(os.path.join(cpp_extension.include_paths()[0], "torch", "library.h")):
        return "torch C++ headers not installed"
    if shutil.which("ninja") is None:
        try:  # the pip wheel (a dependency) lives in the venv's bin, which may not be on PATH
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            return "ninja not found (pip install ninja)"
    source = b""
    for path in _SOURCES + _HEADERS:
        with open(path, "rb") as f:
            source += f.read()
    build_dir = _build_dir(source, model, flags)
    os.makedirs(build_dir, exist_ok=True)
    t0 = time.perf_counter()
    prebuilt = os.path.exists(os.path.join(build_dir, "qwen3vl_kernels.so"))
    try:
        # -fopenmp only compiles at::parallel_for's pragma; the runtime is torch's libgomp.
        cpp_extension.load("qwen3vl_kernels", _SOURCES, build_directory=build_dir, is_python_module=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp", "-w"], verbose=False)
    except Exception as e:  # compiler errors, missing libraries, ...
        msg = str(e).strip().splitlines()
        return f"build failed ({type(e).__name__}: {msg[-1] if msg else ''})"
    if not prebuilt:
        print(f"qwen3vl: compiled CPU kernels in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return None


def available() -> bool:
    """True when the compiled kernels are loaded (builds them on the first call)."""
    if "reason" not in _state:
        reason = _build()
        _state["reason"] = reason
        if reason is not None:
            print(f"qwen3vl: using stock CPU kernels ({reason})", file=sys.stderr)
    return _state["reason"] is None


def unavailable_reason() -> str | None:
    available()
    return _state["reason"]


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if available():
        return torch.ops.qwen3vl_kernels.int8_gemv(x, qweight, scales)
    return (x.float() @ _int8_fp32(qweight, scales).t()).to(x.dtype)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> torch.Tensor:
    if available():
        return torch.ops.qwen3vl_kernels.int4_gemv(x, qweight, scales, zeros, group_size)
    return (x.float() @ _int4_fp32(qweight, scales, zeros, group_size).t()).to(x.dtype)


def amx(enable: bool | None = None) -> bool:
    """Whether ``int8_gemv`` / ``int4_gemv`` use AMX tiles for 5-8 activation rows (CPUs with
    AMX-INT8, when the OS grants the tile state); ``enable`` switches it (tests compare both paths)."""
    if not available():
        return False
    return torch.ops.qwen3vl_kernels.amx(-1 if enable is None else int(enable))


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if available():
        return torch.ops.qwen3vl_kernels.bf16_gemv(x, weight)
    return (x.float() @ weight.float().t()).to(x.dtype)


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """bf16 RMS normalisation (fp32 inside, as the model defines it) of x (..., D) with weight
    (W, D): row r of x uses weight row r % W. One pass (rows split across threads when large)."""
    if available():
        return torch.ops.qwen3vl_kernels.rms_norm_bf16(x, weight, eps)
    d = x.shape[-1]
    y = torch.nn.functional.rms_norm(x.float(), (d,), None, eps).to(x.dtype).view(-1, weight.numel() // d, d)
    return (weight.view(-1, d) * y).view(x.shape)


def rms_norm_rope_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                       rot_sin: torch.Tensor) -> torch.Tensor:
    """Per-head RMS norm then rotary embedding of x (B, T, heads, D) bf16 (heads contiguous), with
    weight (heads, D) and cos, rot_sin (B, T, 1, D) (first half of sin negated) -> (B, T, heads, D),
    rounded after each step exactly as the separate bf16 ops are."""
    if available():
        return torch.ops.qwen3vl_kernels.rms_norm_rope_bf16(x, weight, eps, cos, rot_sin)
    n = rms_norm_bf16(x, weight, eps)
    return n * cos + n.roll(x.shape[-1] // 2, -1) * rot_sin


def silu_mul_bf16(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: x (..., 2I) bf16 = [gate | up] -> silu(gate) * up (..., I),
    rounded like the separate bf16 ops."""
    if available():
        return torch.ops.qwen3vl_kernels.silu_mul_bf16(x)
    gate, up = x.chunk(2, -1)
    return torch.nn.functional.silu(gate) * up


def gelu_tanh_bf16(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GELU of bf16 x in one pass (fp32 inside; agrees with the stock kernel to
    fp32 rounding before the bf16 rounding)."""
    if available():
        return torch.ops.qwen3vl_kernels.gelu_tanh_bf16(x)
    return torch.nn.functional.gelu(x, approximate="tanh")


def vision_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of the vision encoder's q and k, read from qkv (N, 3, H, D) (bf16 or fp32,
    D contiguous) with float32 cos, sin (N, D): (q, k), each (N, H, D) contiguous in qkv's dtype,
    x * cos + rotate_half(x) * sin in fp32 rounded once, bit-identical to the eager ops."""
    if available():
        out = torch.ops.qwen3vl_kernels.vision_rope(qkv, cos, sin)
        return out[0], out[1]
    from ..model.rope import apply_rotary

    c, s = cos[:, None, :], sin[:, None, :]
    return tuple(apply_rotary(qkv[:, i].float(), c, s).to(qkv.dtype) for i in (0, 1))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a few new tokens, q (B, H, T, D), over k/v (B, Hkv, L, D) (bf16, H a multiple
    of Hkv: grouped heads), mask (B, 1, T, L) bool (True = attend) or None (every key) ->
    (B, H, T, D), a view of a (B, T, H, D) tensor. Scores and softmax in fp32; SDPA without the
    extension."""
    if available():
        return torch.ops.qwen3vl_kernels.decode_attention(q, k, v, mask, q.shape[-1] ** -0.5)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def decode_layers(x: torch.Tensor, cos: torch.Tensor, rot_sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot: int, pos: list[int], end: int, mask: torch.Tensor | None,
                  weights: list[torch.Tensor], layout: list[int], eps: float, group_size: int) -> torch.Tensor:
    """Dense decoder layers for one new token per row, x (B, 1, H) bf16 -> (B, 1, H), in one call
    (layer.cpp): the kernels above in the order ``DecoderLayer.forward`` calls them, so
    bit-identical to it. Per layer, ``layout`` holds (cache layer index, number of tensors of
    q/k/v, o, gate/up, down) and ``weights`` its input norm, q_norm, k_norm and post-attention norm
    weights, then the projections: [weight] (bf16), [qweight, scales] (int8) or [qweight, scales,
    zeros] (int4, ``group_size``). Row b is cache slot ``slot + b`` of k_cache / v_cache (layers,
    slots, Hkv, S, D): its key and value go to index ``pos[b]`` and it attends to [0, end) where
    ``mask`` (B, 1, 1, end) bool allows (everywhere when None). Needs the extension (the layers'
    own forward is the fallback)."""
    return torch.ops.qwen3vl_kernels.decode_layers(x, cos, rot_sin, k_cache, v_cache, slot, pos, end, mask, weights,
                                                   layout, eps, group_size)


def int8_gemv_multi(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if available():
        return torch.ops.qwen3vl_kernels.int8_gemv_multi(x, qweight, scales, idx)
    return _multi(x, idx, lambda e: _int8_fp32(qweight[e], scales[e]))


def int4_gemv_multi(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, idx: torch.Tensor) -> torch.Tensor:
    if available():
        return torch.ops.qwen3vl_kernels.int4_gemv_multi(x, qweight, scales, zeros, group_size, idx)
    return _multi(x, idx, lambda e: _int4_fp32(qweight[e], scales[e], zeros[e], group_size))


def bf16_gemv_multi(x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if available():
        return torch.ops.qwen3vl_kernels.bf16_gemv_multi(x, weight, idx)
    return _multi(x, idx, lambda e: weight[e].float())


def _multi(x: torch.Tensor, idx: torch.Tensor, weight) -> torch.Tensor:
    xs = x.float().expand(len(idx), -1)
    return torch.stack([xs[j] @ weight(e).t() for j, e in enumerate(idx.tolist())]).to(x.dtype)


def int8_dequant(qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K) bfloat16 weight, written into ``out`` when given (reuse it: see gemv.cpp)."""
    if out is None:
        out = torch.empty(qweight.shape, dtype=torch.bfloat16, device=qweight.device)
    if available():
        torch.ops.qwen3vl_kernels.int8_dequant(qweight, scales, out)
    else:
        out.copy_(_int8_fp32(qweight, scales))
    return out


def int4_dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = torch.empty(qweight.shape[0], qweight.shape[1] * 2, dtype=torch.bfloat16, device=qweight.device)
    if available():
        torch.ops.qwen3vl_kernels.int4_dequant(qweight, scales, zeros, group_size, out)
    else:
        out.copy_(_int4_fp32(qweight, scales, zeros, group_size))
    return out


# Plain PyTorch versions of the formats' weights, (N, K) float32: the fallbacks' definition.
def _int8_fp32(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.view(-1, 1)


def _int4_fp32(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = qweight.shape[0], qweight.shape[1] * 2
    codes = torch.stack((qweight & 0xF, qweight >> 4), -1).view(n, k // group_size, group_size).float()
    return ((codes - 8) * scales[..., None] + zeros[..., None]).view(n, k)  # (N, K/G, G) -> (N, K)
