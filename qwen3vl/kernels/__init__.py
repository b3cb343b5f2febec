"""CPU kernels for decode and prefill behind one facade, and the reference implementation of
every op they replace. Imports nothing from qwen3vl but ``qwen3vl.env`` (the bottom layer).

Decode multiplies a few activation rows by every weight matrix, so it is bound by how fast the
weights stream from memory; the compiled kernels read each weight once for all rows and stream
int8/int4 weights at ~20-22 GB/s on a 2-core ~30 GB/s Xeon, where the stock kernels reach ~14-15
GB/s. Pointwise passes (norms, rotary embeddings, activations) replace several eager ops each.

Use:
  * ``build()`` compiles (once per CPU, cached under ``$QWEN3VL_HOME``) and loads the kernels ->
    ``BuildResult(ok, reason)``; called explicitly at model load. ``available()`` /
    ``unavailable_reason()`` only report (never build).
  * ``select(dtype, device) -> Ops``: per op, the compiled kernel where it takes that activation
    dtype on that device (and ``build()`` succeeded), else ``reference``. ``REFERENCE``: all
    reference. Model modules (``HoldsOps``) hold an ``Ops`` and call ``ops.rms_norm(...)`` etc.
  * ``reference``: the one plain-PyTorch definition of each op (fallback and fp32 path).
  * ``compiled``: the raw kernels (``compiled.int8_gemv`` ...), valid after a successful build;
    ``decode_layers`` (the one-call decode step, no reference) and ``amx`` are re-exported here.

Ops (x: activations (M, K) fp32 or bf16 -> (M, N) in x's dtype for the products):
  rms_norm, rms_norm_rope (q/k norm + rotary), silu_mul, gelu, vision_rope, attention (SDPA; the
  decode kernel for a few tokens), decode_attention, linear (+ linear_rows), bf16_gemv, int8_gemv,
  int4_gemv and their *_multi variants (a MoE token's k experts in one call), int8_dequant,
  int4_dequant (the bf16 weight: fp32 arithmetic, one rounding). Formats: see ``reference``.
The int8/int4 kernels use integer dot products (AVX-512 VNNI) on quantized activations (int8:
int16 per row, error <= 2^-16 of its max; int4: int8 per block of 128, <= 1/254), and AMX tiles
for 5-8 rows where the CPU and OS allow (same products, summed in another order; ``amx``).
"""
from __future__ import annotations

from . import compiled, reference
from .extension import BuildResult, available, build, sources, unavailable_reason
from .ops import OPS, REFERENCE, HoldsOps, Ops, select


def amx(enable: bool | None = None) -> bool:
    """Whether the int8/int4 kernels use AMX tiles for 5-8 rows (False without the kernels);
    ``enable`` switches it."""
    return available() and compiled.amx(enable)


# Dense decoder layers for one new token per row in one call (no reference: the layers' forward
# is the fallback). The model calls it through this name, so a test can wrap it here.
decode_layers = compiled.decode_layers


__all__ = ["BuildResult", "HoldsOps", "OPS", "Ops", "REFERENCE", "amx", "available", "build", "compiled",
           "decode_layers", "reference", "select", "sources", "unavailable_reason"]
