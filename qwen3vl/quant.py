"""Weight-only quantization of the text decoder's linear layers, done at load time.

Formats (``quantization=`` on ``from_pretrained`` / ``LLM`` / the CLI and server flags):
  * ``int8``: symmetric per-output-channel scales.
  * ``int4``: asymmetric group-wise scales/zeros along the input dimension (group 32-128,
    default 64), two codes per byte.
Decode (up to ``DECODE_ROWS`` activation rows) uses the compiled matrix-vector kernels of
``qwen3vl.kernels``, which read these layouts as stored; without them (no AVX-512 BF16, no
compiler, QWEN3VL_NO_EXT=1) it falls back to ``torch._weight_int8pack_mm`` /
``torch._weight_int4pack_mm_for_cpu`` with bf16 activations (about half the speed).
Policy: the decoder's q/k/v, o, gate/up and down projections and the ``lm_head`` are quantized
(lm_head always int8: it is the largest matrix and the most sensitive to rounding); token
embeddings (one row read per token) and the whole vision encoder stay in the model dtype.
Prefill (many rows) dequantizes each matrix to bf16 and uses the GEMM, which is compute-bound
anyway. Weights are quantized row by row as the checkpoint streams in, so the full-precision
model never exists in memory.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

QUANT_MODES = ("int8", "int4")
DECODE_ROWS = 8  # up to this many activation rows use the packed matrix-vector kernels


class QuantLinear(nn.Module):
    """Linear layer with int8 or int4 weights; ``load_weight(rows, tensor)`` fills rows as the
    checkpoint streams in and ``finalize()`` packs them."""

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int = 64, device=None):
        super().__init__()
        if mode not in QUANT_MODES:
            raise ValueError(f"unknown quantization {mode!r}; use one of {QUANT_MODES}")
        if mode == "int4" and (group_size not in (32, 64, 128) or in_features % group_size):
            raise ValueError(f"int4 group size must be 32, 64 or 128 and divide {in_features}; got {group_size}")
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        n, k = out_features, in_features
        # int8 values (int8 mode) or 0..15 codes (int4 mode, packed by finalize()).
        self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8 if mode == "int8" else torch.uint8,
                                                    device=device))
        groups = 1 if mode == "int8" else k // group_size
        self.register_buffer("scales", torch.zeros(n, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(n, groups if mode == "int4" else 0, device=device))
        self.packed: torch.Tensor | None = None
        self.scales_and_zeros: torch.Tensor | None = None

    @property
    def logical_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @torch.no_grad()
    def load_weight(self, rows: tuple[int, int] | None, w: torch.Tensor) -> None:
        """Quantize ``w`` (r, K) into rows ``rows`` (all rows when None), a slice of rows at a time
        so the fp32 temporaries stay small (the 2B lm_head in fp32 alone would be 1.2 GB) and fast."""
        a, b = rows or (0, self.out_features)
        step = max(1, 2**16 // self.in_features)  # fp32 temporaries of 256 KB: cache-resident, no page faults
        for i in range(0, b - a, step):
            self._quantize_rows(a + i, min(b, a + i + step), w[i : i + step])

    def _quantize_rows(self, a: int, b: int, w: torch.Tensor) -> None:
        w = w.to(self.qweight.device, torch.float32)
        if self.mode == "int8":
            scale = w.abs().amax(1).clamp(min=1e-10) / 127  # (r,)
            self.qweight[a:b] = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self.scales[a:b, 0] = scale
            return
        g = w.view(w.shape[0], -1, self.group_size)  # (r, K/G, G)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo).clamp(min=1e-10) / 15
        codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
        self.qweight[a:b] = codes.view(w.shape[0], -1).to(torch.uint8)
        self.scales[a:b], self.zeros[a:b] = scale, lo + 8 * scale  # w = (code - 8) * scale + zero

    @torch.no_grad()
    def finalize(self) -> None:
        """Build the kernels' layouts once all rows are loaded."""
        # The packed matrix-vector kernels used here are CPU kernels; elsewhere (CUDA: unverified)
        # every call dequantizes and uses the GEMM.
        self.packed_kernels = self.qweight.device.type == "cpu"
        # The compiled kernels (qwen3vl.kernels) read qweight/scales/zeros as they are, at about
        # twice the stock kernels' speed, so the stock kernels' copies are only built without them.
        self.ext_kernels = self.packed_kernels and kernels.available()
        if self.mode == "int8":
            self.scales_bf16 = self.scales[:, 0].to(torch.bfloat16)
            return
        codes = self.qweight
        if self.packed_kernels and not self.ext_kernels:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
            self.scales_and_zeros = torch.stack([self.scales, self.zeros], -1).transpose(0, 1).contiguous().to(
                torch.bfloat16)
        # Our own nibble pairs (even k low, odd k high), half a byte per weight: the compiled
        # kernels' decode layout, and what prefill dequantizes.
        self.qweight = codes[:, 0::2] | (codes[:, 1::2] << 4)  # (N, K/2) uint8

    def dequantized(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K) bfloat16 weight (for prefill GEMMs and tests); the compiled kernels write it
        into ``out`` when given."""
        if self.ext_kernels:
            if self.mode == "int8":
                return kernels.int8_dequant(self.qweight, self.scales, out)
            return kernels.int4_dequant(self.qweight, self.scales, self.zeros, self.group_size, out)
        if self.mode == "int8":
            return self.qweight.to(torch.bfloat16) * self.scales_bf16[:, None]
        n, k = self.out_features, self.in_features
        codes = torch.stack((self.qweight & 0xF, self.qweight >> 4), -1).view(n, k // self.group_size, self.group_size)
        w = (codes.to(torch.bfloat16) - 8) * self.scales.to(torch.bfloat16)[..., None] + self.zeros.to(torch.bfloat16)[..., None]
        return w.view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.ext_kernels and x2.shape[0] <= DECODE_ROWS:
            if x2.dtype not in (torch.float32, torch.bfloat16):
                x2 = x2.to(torch.bfloat16)
            if self.mode == "int8":
                y = kernels.int8_gemv(x2, self.qweight, self.scales)
            else:
                y = kernels.int4_gemv(x2, self.qweight, self.scales, self.zeros, self.group_size)
        else:
            x2 = x2.to(torch.bfloat16)
            if x2.shape[0] > DECODE_ROWS or not self.packed_kernels:
                y = F.linear(x2, self.dequantized(_dequant_buffer(self) if self.ext_kernels else None))
            elif self.mode == "int8":
                y = torch._weight_int8pack_mm(x2, self.qweight, self.scales_bf16)
            else:
                y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


_SCRATCH = threading.local()
_SCRATCH_MAX = 64 * 2**20  # bytes; larger matrices (a full-logits lm_head) get a fresh tensor


def _dequant_buffer(lin: QuantLinear) -> torch.Tensor | None:
    """A per-thread bf16 buffer reused for every prefill dequantization: writing each matrix
    into fresh memory costs more in page faults than the dequantization itself. The result is
    only read by the GEMM that follows, before the next layer overwrites it."""
    n, k = lin.out_features, lin.in_features
    if 2 * n * k > _SCRATCH_MAX:
        return None
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n * k or buf.device != lin.qweight.device:
        buf = _SCRATCH.buf = torch.empty(max(n * k, 0 if buf is None else buf.numel()), dtype=torch.bfloat16,
                                         device=lin.qweight.device)
    return buf[: n * k].view(n, k)


def quantize_modules(model: nn.Module, mode: str, group_size: int = 64) -> None:
    """Swap the decoder's projections (and lm_head, int8) for QuantLinear, before loading."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; use one of {QUANT_MODES}")
    if model.config.tie_word_embeddings:
        model.lm_head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False, device="meta")
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and (n == "lm_head" or (n.startswith("model.language_model.layers.")
                                                                    and not n.endswith("mlp.gate")))]
    for name, lin in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        m = "int8" if name == "lm_head" else mode
        setattr(parent, attr, QuantLinear(lin.in_features, lin.out_features, m, group_size, device="meta"))


def finalize(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.finalize()
