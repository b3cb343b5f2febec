"""Fine-grained FP8 checkpoints (the ``-FP8`` releases): which tensors are FP8, and their
dequantization tile by tile.

A quantized Linear stores ``X.weight`` as float8_e4m3fn ``(N, K)`` and ``X.weight_scale_inv``
``(ceil(N/128), ceil(K/128))`` (bf16 or fp32): the weight is each 128x128 tile times its scale,
edge tiles partial. A Linear is FP8 exactly when its scale exists; ``modules_to_not_convert``
(config.json ``quantization_config``) names modules that must not have one.

Dequantization is done in fp32 (``fp8.float() * scale``: both factors are exact in fp32, so
this is one rounding of the exact product) one row tile (128 rows) at a time, so a caller can
stream each tile straight into its destination (runtime dtype, or int8/int4 rows) and never
holds more than a tile in fp32.
"""
from __future__ import annotations

import re
from typing import Iterator

import torch

from .config import QuantizationConfig

SCALE_SUFFIX = ".weight_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_DTYPES = (torch.bfloat16, torch.float32)


class Fp8Error(ValueError):
    """An FP8 checkpoint whose weights and scales do not fit together or are not supported."""


def excluded(module: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether ``module`` (a dotted module path) is in ``modules_to_not_convert``, with the pinned
    reference's rules (transformers ``should_convert_module``): a pattern matches from the start
    up to a module boundary, as a regex with that boundary ("mlp.gate" matches "...mlp.gate"
    only as a suffix, never "mlp.gate_proj"), or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in patterns:
        try:
            if re.match(rf"(?:{key}){boundary}", module):
                return True
        except re.error:  # not a regex: a plain name
            pass
        if module.endswith(key):
            return True
    return False


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The ``weight_scale_inv`` shape of an (N, K) weight: one scale per (partial) tile."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def pair_scales(found: dict, qcfg: QuantizationConfig | None) -> dict[str, str]:
    """FP8 weight name -> its scale name, from the checkpoint's tensor entries (``.dtype`` and
    ``.shape`` each). Every scale must have its FP8 weight, every FP8 weight its scale, with
    the right shapes and dtypes, outside ``modules_to_not_convert``; else Fp8Error."""
    qcfg = qcfg or QuantizationConfig()
    pairs: dict[str, str] = {}
    for s in sorted(n for n in found if n.endswith(SCALE_SUFFIX)):
        w = s[: -len("_scale_inv")]
        module = w[: -len(".weight")]
        if w not in found:
            raise Fp8Error(f"checkpoint has {s} but no {w}")
        we, se = found[w], found[s]
        if excluded(module, qcfg.modules_to_not_convert):
            raise Fp8Error(f"checkpoint stores {s}, but quantization_config.modules_to_not_convert "
                           f"{list(qcfg.modules_to_not_convert)} excludes {module} from FP8")
        if we.dtype != torch.float8_e4m3fn:
            raise Fp8Error(f"{w}: dtype {we.dtype} next to a weight_scale_inv; supported: torch.float8_e4m3fn "
                           f"(fmt {qcfg.fmt!r})")
        if se.dtype not in SCALE_DTYPES:
            raise Fp8Error(f"{s}: dtype {se.dtype}; supported scale dtypes: {list(SCALE_DTYPES)}")
        if len(we.shape) != 2:
            raise Fp8Error(f"{w}: FP8 weights must be 2-D (N, K) matrices, got shape {list(we.shape)} "
                           "(fused FP8 expert stacks are not supported: one tensor per expert is)")
        want = scale_shape(we.shape, qcfg.weight_block_size)
        if tuple(se.shape) != want:
            raise Fp8Error(f"{s}: shape {list(se.shape)}, expected {list(want)} for weight {list(we.shape)} "
                           f"in {list(qcfg.weight_block_size)} blocks")
        pairs[w] = s
    for name, e in found.items():
        if e.dtype in FP8_DTYPES and name not in pairs:
            raise Fp8Error(f"{name}: {e.dtype} weight without {name[: -len('.weight')]}{SCALE_SUFFIX}")
    return pairs


def row_tiles(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
              ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Dequantize FP8 ``q`` (N, K) with ``scale`` (ceil(N/bn), ceil(K/bk)) one row tile at a time:
    yields (first row, end row, fp32 rows (<= bn, K)), exactly ``q.float() * scale`` per tile."""
    bn, bk = block
    n, k = q.shape
    for i, r0 in enumerate(range(0, n, bn)):
        s = scale[i].to(torch.float32).repeat_interleave(bk)[:k]  # (K,): each tile's scale per column
        yield r0, min(n, r0 + bn), q[r0 : r0 + bn].to(torch.float32) * s


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128),
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole (N, K) matrix in ``dtype`` (fp32 arithmetic, one rounding to ``dtype``)."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for r0, r1, rows in row_tiles(q, scale, block):
        out[r0:r1] = rows
    return out
