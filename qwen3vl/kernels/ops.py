"""The facade: one ``Ops`` object per (activation dtype, device), chosen once at load, whose
attributes are the compiled kernel or the reference implementation of each op.

Model modules hold an ``Ops`` (``REFERENCE`` until the model's ``select_kernels`` hands them
``select(dtype, device)``) and call ``ops.<op>(...)`` with no checks of their own: which
implementation runs was decided here, per op, from what the kernels take.
"""
from __future__ import annotations

import torch

from . import compiled, extension, reference

# Every op, with the signature of its reference function.
OPS = ("rms_norm", "rms_norm_rope", "silu_mul", "gelu", "vision_rope", "attention", "decode_attention", "linear",
       "linear_rows", "bf16_gemv", "int8_gemv", "int4_gemv", "bf16_gemv_multi", "int8_gemv_multi", "int4_gemv_multi",
       "int8_dequant", "int4_dequant")
# Compiled on CPU: for any activation dtype (the quantized products convert other dtypes to bf16
# first), for bf16 or fp32 (the vision rotary pass), for bf16 only (the rest).
_QUANT = ("int8_gemv", "int4_gemv", "int8_gemv_multi", "int4_gemv_multi", "int8_dequant", "int4_dequant")
_BF16_FP32 = ("vision_rope",)
_BF16 = ("rms_norm", "rms_norm_rope", "silu_mul", "gelu", "attention", "decode_attention", "linear", "linear_rows",
         "bf16_gemv", "bf16_gemv_multi")


class Ops:
    """One implementation per op (``OPS``): ``compiled`` names those that run the compiled kernels,
    the others are ``reference``'s. The compiled kernels have no autograd: where a call would be
    recorded (grad mode on and a tensor argument requiring grad) a compiled op runs its reference
    instead (the quantized products excepted: integer weights never train). ``amx``: whether the int8/int4 kernels use AMX tiles for 5-8
    activation rows (decided by the CPU and OS when the kernels load)."""

    def __init__(self, name: str, compiled_ops=(), amx: bool = False):
        self.name = name
        self.compiled = frozenset(compiled_ops)
        self.amx = amx
        for op in OPS:
            ref = getattr(reference, op)
            fast = getattr(compiled, op)
            # The quantized products take integer weights, which never train: no switch needed.
            setattr(self, op, ref if op not in self.compiled else fast if op in _QUANT else _unless_grad(fast, ref))

    def __repr__(self) -> str:
        return f"Ops({self.name}: {len(self.compiled)} of {len(OPS)} ops compiled, amx={self.amx})"


def _unless_grad(fast, ref):
    """``fast`` (a compiled kernel: no autograd), or ``ref`` when autograd would record the call:
    grad mode on and a tensor argument requiring grad. Under ``no_grad`` / ``inference_mode`` (the
    engine, benchmarks) the cost is one ``torch.is_grad_enabled()``."""

    def op(*args, **kwargs):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return ref(*args, **kwargs)
        return fast(*args, **kwargs)

    op.__name__, op.__doc__ = ref.__name__, ref.__doc__
    return op


REFERENCE = Ops("reference")
_selected: dict[torch.dtype, Ops] = {}


def select(dtype: torch.dtype, device) -> Ops:
    """The ops for activations of ``dtype`` on ``device``: compiled where the kernels are loaded
    (``build()``) and take that dtype on that device, reference elsewhere. Never builds."""
    if torch.device(device).type != "cpu" or not extension.available():
        return REFERENCE
    if dtype not in _selected:
        names = _QUANT + (_BF16_FP32 if dtype in (torch.bfloat16, torch.float32) else ())
        names += _BF16 if dtype == torch.bfloat16 else ()
        _selected[dtype] = Ops(f"compiled CPU kernels for {dtype}", names, compiled.amx())
    return _selected[dtype]


class HoldsOps:
    """Mixin for modules that call ops: ``ops`` is ``REFERENCE`` until ``use_ops`` hands them the
    load-time choice. Converting or moving the module's weights (``_apply``: ``to``, ``float``,
    ...) returns it to ``REFERENCE``, as the choice depended on their dtype and device (the
    model's ``select_kernels`` chooses again)."""

    ops: Ops = REFERENCE

    def use_ops(self, ops: Ops) -> None:
        self.ops = ops

    def _apply(self, fn, *args, **kwargs):
        self.use_ops(REFERENCE)
        return super()._apply(fn, *args, **kwargs)
