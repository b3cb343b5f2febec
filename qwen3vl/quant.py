"""Weight-only quantization of the text decoder's linear layers and MoE experts, done at load time.

Formats (``quantization=`` on ``from_pretrained`` / ``LLM`` / the CLI and server flags):
  * ``int8``: symmetric per-output-channel scales.
  * ``int4``: asymmetric group-wise scales/zeros along the input dimension (group 32-128,
    default 64), two codes per byte; scale and zero in bfloat16 (0.5625 bytes per weight at
    group 64: fp32 ones would add 11 % to the bytes every decode step reads).
Decode (up to ``DECODE_ROWS`` activation rows) uses the compiled matrix-vector kernels of
``qwen3vl.kernels``, which read these layouts as stored; without them (no AVX-512 BF16, no
compiler, QWEN3VL_NO_EXT=1) it falls back to ``torch._weight_int8pack_mm`` /
``torch._weight_int4pack_mm_for_cpu`` with bf16 activations (about half the speed; int4 MoE
experts then dequantize and use the GEMM). The path is chosen once, in ``finalize``. The compiled
kernels round activations (int8: to int16 per row, int4: to int8 per block of 128; 5-8 rows use
AMX tiles where available; see ``qwen3vl.kernels``).
Policy (``layer_mode``): the MLP (gate/up, down) projections and the MoE experts are in the
chosen format; the attention projections (q/k/v, o) and the ``lm_head`` are int8 in both modes.
Attention is where rounding hurts most: on the tiny random checkpoint, int4 attention alone takes
the logits error from ~0.03 to ~0.16 of the max logit (``bench/bench_quality.py``), while int4
MLPs cost almost nothing; in the 2B architecture attention is a quarter of a layer's weights, so
int8 attention costs int4 decode ~15 % more bytes per token. The lm_head is the largest matrix
and maps rounding straight onto the logits. Token embeddings (one row read per token), MoE
routers and the whole vision encoder stay in the model dtype.
Prefill (many rows) dequantizes each matrix to bf16 (one definition, ``kernels.reference``:
fp32 arithmetic, one rounding; compiled on CPU) and uses the GEMM, which is compute-bound anyway.
Weights are quantized row by row as the checkpoint streams in, so the full-precision model never
exists in memory.
FP8 checkpoints (``qwen3vl.fp8``) arrive here as dequantized fp32 row tiles; ``"fp8"`` instead
keeps their FP8 weights for CUDA block-scaled matmuls (``Fp8Linear``, unverified on a GPU).
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8, kernels

QUANT_MODES = ("int8", "int4")
FP8_MODE = "fp8"  # CUDA only: keep an FP8 checkpoint's weights (Fp8Linear)
DECODE_ROWS = 8  # up to this many activation rows use the packed matrix-vector kernels


class _Quantized(nn.Module):
    """``lead + (N, K)`` weights in one format: a single matrix (lead ``()``) or a stack of MoE
    experts (lead ``(E,)``). ``load_weight(rows, tensor)`` fills rows as the checkpoint streams
    in and ``finalize()`` packs them."""

    def __init__(self, lead: tuple[int, ...], in_features: int, out_features: int, mode: str, group_size: int,
                 device=None):
        super().__init__()
        if mode not in QUANT_MODES:
            raise ValueError(f"unknown quantization {mode!r}; use one of {QUANT_MODES}")
        if mode == "int4" and (group_size not in (32, 64, 128) or in_features % group_size):
            raise ValueError(f"int4 group size must be 32, 64 or 128 and divide {in_features}; got {group_size}")
        self.lead, self.in_features, self.out_features = lead, in_features, out_features
        self.mode, self.group_size = mode, group_size
        n, k = out_features, in_features
        # int8 values, or int4 codes 0..15 as nibble pairs (even k low, odd k high) from the start:
        # a byte per code first would need twice the int4 model's memory while loading.
        if mode == "int8":
            self.register_buffer("qweight", torch.zeros(*lead, n, k, dtype=torch.int8, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(*lead, n, k // 2, dtype=torch.uint8, device=device))
        groups = 1 if mode == "int8" else k // group_size
        sdt = torch.float32 if mode == "int8" else torch.bfloat16
        self.register_buffer("scales", torch.zeros(*lead, n, groups, dtype=sdt, device=device))
        self.register_buffer("zeros", torch.zeros(*lead, n, groups if mode == "int4" else 0, dtype=sdt,
                                                  device=device))
        self.packed: torch.Tensor | None = None
        self.scales_and_zeros: torch.Tensor | None = None
        self.ops = kernels.REFERENCE  # the quantized ops: chosen in finalize, by device
        self._decode = self._dequant_matmul  # up to DECODE_ROWS rows: chosen in finalize

    @property
    def logical_shape(self) -> tuple[int, ...]:
        return (*self.lead, self.out_features, self.in_features)

    def _matrices(self):
        """Index of each matrix into the lead dimensions: ``()`` alone, or ``(e,)`` per expert."""
        return [()] if not self.lead else [(e,) for e in range(self.lead[0])]

    @torch.no_grad()
    def load_weight(self, rows: tuple[int, int] | None, w: torch.Tensor, expert: int | None = None) -> None:
        """Quantize ``w`` (lead + (r, K), any strides) into rows ``rows`` (all rows when None), a
        slice of rows at a time so the fp32 temporaries stay small (the 2B lm_head in fp32 alone
        would be 1.2 GB). ``expert``: ``w`` is (r, K) rows of that expert alone (FP8
        releases store one tensor per expert, dequantized here a row tile at a time)."""
        a, b = rows or (0, self.out_features)
        # fp32 temporaries of 4 MB: kept in the heap (``allocator.keep_heap``), so no page faults;
        # a (12288, 2048) matrix quantized in 14 (int8) / 54 (int4) ms, 32 / 108 ms with 256 KB slices
        step = max(1, 2**20 // self.in_features)
        for idx in self._matrices() if expert is None else [(expert,)]:
            m = _contiguous(w[idx] if expert is None else w)  # one (transposed) expert matrix at most: a few MB
            for i in range(0, b - a, step):
                self._quantize_rows(idx, a + i, min(b, a + i + step), m[i : i + step])

    def _quantize_rows(self, idx: tuple, a: int, b: int, w: torch.Tensor) -> None:
        w = w.to(self.qweight.device, torch.float32)
        q, s = self.qweight[idx], self.scales[idx]
        if self.mode == "int8":
            scale = w.abs().amax(1).clamp(min=1e-10) / 127  # (r,)
            q[a:b] = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            s[a:b, 0] = scale
            return
        g = w.view(w.shape[0], -1, self.group_size)  # (r, K/G, G)
        lo, hi = g.amin(-1), g.amax(-1)  # (r, K/G)
        # w = (code - 8) * scale + zero, codes rounded against the stored (bf16) scale and zero;
        # zero is the group's midpoint, near 0, so its bf16 rounding costs little.
        scale = ((hi - lo).clamp(min=1e-10) / 15).bfloat16()
        zero = (lo + 8 * scale.float()).bfloat16()
        base = zero.float() - 8 * scale.float()  # the weight of code 0
        codes = torch.round((g - base[..., None]) / scale.float()[..., None]).clamp(0, 15)
        codes = codes.view(w.shape[0], -1).to(torch.uint8)  # (r, K)
        q[a:b] = codes[:, 0::2] | (codes[:, 1::2] << 4)
        s[a:b], self.zeros[idx][a:b] = scale, zero

    @torch.no_grad()
    def finalize(self) -> None:
        """Choose the decode path and build its layouts once all rows are loaded. Builds the
        compiled kernels first (once per process; the choice depends on them)."""
        kernels.build()
        # The quantized ops take fp32 and bf16 activations alike (others are converted to bf16).
        self.ops = kernels.select(torch.bfloat16, self.qweight.device)
        if "int8_gemv" in self.ops.compiled:  # reads qweight/scales/zeros as stored, ~2x the stock speed
            self._decode = self._decode_compiled
        elif self.qweight.device.type != "cpu":  # the stock packed kernels are CPU kernels (CUDA: unverified)
            self._decode = self._dequant_matmul
        elif self.mode == "int8":
            self.scales_bf16 = self.scales[..., 0].to(torch.bfloat16)
            self._decode = self._decode_int8pack
        elif not self.lead:
            # Our nibble pairs are the compiled kernels' decode layout and what prefill dequantizes;
            # the stock int4 kernel wants its own packing of the codes.
            codes = torch.stack((self.qweight & 0xF, self.qweight >> 4), -1).view(self.out_features, -1)
            self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
            self.scales_and_zeros = torch.stack([self.scales, self.zeros], -1).transpose(0, 1).contiguous().to(
                torch.bfloat16)
            self._decode = self._decode_int4pack

    def dequantized(self, idx: tuple = (), out: torch.Tensor | None = None) -> torch.Tensor:
        """Matrix ``idx`` as (N, K) bfloat16 (for prefill GEMMs and tests), written into ``out``
        when given."""
        q, s = self.qweight[idx], self.scales[idx]
        if self.mode == "int8":
            return self.ops.int8_dequant(q, s, out)
        return self.ops.int4_dequant(q, s, self.zeros[idx], self.group_size, out)

    def _matmul(self, idx: tuple, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) @ matrix ``idx``.T -> (M, N) in x2's dtype (bf16 on the stock paths)."""
        return self._decode(idx, x2) if x2.shape[0] <= DECODE_ROWS else self._dequant_matmul(idx, x2)

    def _decode_compiled(self, idx: tuple, x2: torch.Tensor) -> torch.Tensor:
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.to(torch.bfloat16)
        if self.mode == "int8":
            return self.ops.int8_gemv(x2, self.qweight[idx], self.scales[idx])
        return self.ops.int4_gemv(x2, self.qweight[idx], self.scales[idx], self.zeros[idx], self.group_size)

    def _decode_int8pack(self, idx: tuple, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight[idx], self.scales_bf16[idx])

    def _decode_int4pack(self, idx: tuple, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.packed, self.group_size,
                                                 self.scales_and_zeros)

    def _dequant_matmul(self, idx: tuple, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2.to(torch.bfloat16), self.dequantized(idx, _dequant_buffer(self)))


class QuantLinear(_Quantized):
    """Linear layer (no bias) with int8 or int4 weights."""

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int = 64, device=None):
        super().__init__((), in_features, out_features, mode, group_size, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul((), x.reshape(-1, self.in_features))  # (M, K) -> (M, N)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def kernel_rows(self) -> int:
        """Most activation rows ``forward`` gives the compiled kernels."""
        return DECODE_ROWS

    def kernel_weights(self) -> list[torch.Tensor] | None:
        """The tensors ``kernels.decode_layers`` reads for this format, or None without the
        compiled kernels."""
        if "int8_gemv" not in self.ops.compiled:
            return None
        return [self.qweight, self.scales] if self.mode == "int8" else [self.qweight, self.scales, self.zeros]


class QuantExperts(_Quantized):
    """A MoE block's stacked expert matrices (E, N, K), stored as in ``QuantLinear`` per expert."""

    def __init__(self, experts: int, in_features: int, out_features: int, mode: str, group_size: int = 64,
                 device=None):
        super().__init__((experts,), in_features, out_features, mode, group_size, device)

    def linear(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x (n, K) @ expert e's matrix.T -> (n, N) in x's dtype."""
        return self._matmul((e,), x).to(x.dtype)

    def linear_multi(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Row j of x (or its single row) @ expert idx[j]'s matrix.T -> (J, N): one token's k
        experts in one kernel call (decode; the reference computes the same in fp32, slowly)."""
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.to(torch.bfloat16)
        if self.mode == "int8":
            return self.ops.int8_gemv_multi(x, self.qweight, self.scales, idx)
        return self.ops.int4_gemv_multi(x, self.qweight, self.scales, self.zeros, self.group_size, idx)


def _contiguous(w: torch.Tensor) -> torch.Tensor:
    """``w.contiguous()`` for a (N, K) matrix; a transposed one (released expert layout) is copied
    in column tiles, ~4x faster than one strided copy."""
    if w.is_contiguous():
        return w
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    for k in range(0, w.shape[-1], 64):
        out[..., k : k + 64] = w[..., k : k + 64]
    return out


_SCRATCH = threading.local()
_SCRATCH_MAX = 64 * 2**20  # bytes; larger matrices (a full-logits lm_head) get a fresh tensor


def _dequant_buffer(lin: _Quantized) -> torch.Tensor | None:
    """A per-thread bf16 buffer reused for every prefill dequantization: writing each matrix
    into fresh memory costs more in page faults than the dequantization itself. The result is
    only read by the GEMM that follows, before the next layer overwrites it."""
    n, k = lin.out_features, lin.in_features
    if 2 * n * k > _SCRATCH_MAX:
        return None
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n * k or buf.device != lin.qweight.device:
        # A normal tensor even when first needed under inference_mode: an inference tensor could not
        # be written to by a later call made outside it.
        with torch.inference_mode(False):
            buf = _SCRATCH.buf = torch.empty(max(n * k, 0 if buf is None else buf.numel()), dtype=torch.bfloat16,
                                             device=lin.qweight.device)
    return buf[: n * k].view(n, k)


class Fp8Linear(nn.Module):
    """Linear layer (no bias) keeping an FP8 checkpoint's e4m3 weights (N, K) and 128x128 block
    scales, for CUDA (``quantization="fp8"``; UNVERIFIED: no GPU was at hand when written). On
    Hopper (sm90, CUDA >= 12.9) with K and N multiples of 128, activations are quantized per token
    and 128 columns (the checkpoints' dynamic scheme) and multiplied by ``F.scaled_mm`` with
    blockwise scales (1x128 x 128x128); otherwise the weight is dequantized (fp32 arithmetic) to
    the activation dtype for each call. Fused q/k/v and gate/up parts must each have a multiple
    of 128 rows (true of every release) so their scale grids stack."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = (128, 128), device=None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.blockwise = True  # F.scaled_mm where _blockwise_fp8_ok; off after its first refusal
        grid = fp8.scale_shape((out_features, in_features), self.block)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale_inv", torch.zeros(grid, dtype=torch.float32, device=device))

    @property
    def logical_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def load_weight(self, rows, w: torch.Tensor, expert=None) -> None:
        raise ValueError(f"quantization={FP8_MODE!r} keeps an FP8 checkpoint's weights; this weight "
                         f"({w.dtype}) has no weight_scale_inv: load it with quantization=None, int8 or int4")

    @torch.no_grad()
    def load_fp8(self, rows: tuple[int, int] | None, q: torch.Tensor, scale: torch.Tensor) -> None:
        """FP8 rows ``rows`` (all when None) and their scale grid, as stored."""
        a, b = rows or (0, self.out_features)
        bn = self.block[0]
        if a % bn or (b % bn and b != self.out_features):
            raise ValueError(f"quantization={FP8_MODE!r}: fused rows {a}:{b} are not on {bn}-row tiles; "
                             "load this checkpoint with quantization=None (dequantized)")
        self.weight[a:b] = q.to(self.weight.device)
        self.weight_scale_inv[a // bn : -(-b // bn)] = scale.to(self.weight_scale_inv.device, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, (n, k) = x.shape, (self.out_features, self.in_features)
        x2 = x.reshape(-1, k)  # (M, K)
        y = None
        if self.blockwise and _blockwise_fp8_ok(x2, n, k):
            try:
                y = _blockwise_fp8_mm(x2, self.weight, self.weight_scale_inv)
            except RuntimeError:  # a shape or build the blockwise GEMM refuses: dequantize from now on
                self.blockwise = False
        if y is None:
            y = F.linear(x2, fp8.dequantize(self.weight, self.weight_scale_inv, self.block, x2.dtype))
        return y.to(x.dtype).reshape(*shape[:-1], n)


def quantize_activations(x2: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 activations: per row and ``group`` columns, scale = amax / 448 ->
    (e4m3 (M, K), fp32 scales (M, K/group))."""
    m, k = x2.shape
    g = x2.float().view(m, k // group, group)
    s = g.abs().amax(-1).clamp(min=1e-12) / 448
    return (g / s[..., None]).to(torch.float8_e4m3fn).view(m, k), s


def _blockwise_fp8_ok(x2: torch.Tensor, n: int, k: int) -> bool:
    if x2.device.type != "cuda" or n % 128 or k % 128 or not hasattr(F, "scaled_mm"):
        return False
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return torch.cuda.get_device_capability(x2.device)[0] == 9 and cuda >= (12, 9)


def _blockwise_fp8_mm(x2: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """(M, K) @ FP8 (N, K).T with 1x128 activation and 128x128 weight scales (torch's layouts:
    activation scales M-major, weight scales (ceil4(K/128), N/128) as a transposed view)."""
    xq, sa = quantize_activations(x2)
    kb = ws.shape[1]
    sb = torch.zeros(ws.shape[0], -(-kb // 4) * 4, dtype=torch.float32, device=ws.device)
    sb[:, :kb] = ws
    return F.scaled_mm(xq, w.t(), sa.t().contiguous().t(), F.ScalingType.BlockWise1x128, sb.t(),
                       F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)


def check_device(mode: str | None, device) -> None:
    """``quantization="fp8"`` is for CUDA only (its matmuls); refuse it up front elsewhere."""
    if mode == FP8_MODE and torch.device(device).type != "cuda":
        raise ValueError(f"quantization={FP8_MODE!r} keeps FP8 weights for CUDA block-scaled matmuls; on "
                         f"{torch.device(device).type} load FP8 checkpoints with quantization=None (dequantized "
                         "to dtype), 'int8' or 'int4'")


def layer_mode(name: str, mode: str) -> str:
    """The format of linear layer ``name`` (a module path) when the model is quantized to
    ``mode``: attention projections and the lm_head stay int8 (see the module docstring)."""
    return "int8" if name == "lm_head" or ".self_attn." in name else mode


def quantize_modules(model: nn.Module, mode: str, group_size: int = 64) -> None:
    """Swap the decoder's projections and the lm_head for QuantLinear (formats per
    ``layer_mode``) and MoE expert stacks for QuantExperts, before loading; ``"fp8"``: the
    FP8 checkpoint's decoder projections for Fp8Linear (``fp8_modules``)."""
    if mode == FP8_MODE:
        return fp8_modules(model)
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
        m = layer_mode(name, mode)
        setattr(parent, attr, QuantLinear(lin.in_features, lin.out_features, m, group_size, device="meta"))
    for moe in [m for m in model.modules() if _has_expert_stacks(m)]:
        for attr in ("gate_up_proj", "down_proj"):
            e, n, k = getattr(moe, attr).shape
            delattr(moe, attr)  # a parameter; the module takes its name
            setattr(moe, attr, QuantExperts(e, k, n, mode, group_size, device="meta"))


def fp8_modules(model: nn.Module) -> None:
    """``quantization="fp8"``: the text decoder's attention and dense MLP projections become
    Fp8Linear unless ``modules_to_not_convert`` excludes them (checked on the checkpoint's names,
    q_proj / gate_proj for the fused ones). MoE experts stay in the model dtype (dequantized)."""
    q = model.config.quantization
    if q is None:
        raise ValueError(f"quantization={FP8_MODE!r} needs an FP8 checkpoint (config.json quantization_config)")
    fused = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj"}
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
                      and n.startswith("model.language_model.layers.") and not n.endswith("mlp.gate")]:
        parent_name, _, attr = name.rpartition(".")
        if fp8.excluded(f"{parent_name}.{fused.get(attr, attr)}", q.modules_to_not_convert):
            continue
        setattr(model.get_submodule(parent_name), attr,
                Fp8Linear(lin.in_features, lin.out_features, q.weight_block_size, device="meta"))


def finalize(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, _Quantized):
            m.finalize()


def _has_expert_stacks(m: nn.Module) -> bool:
    """A MoE block (``model.text.SparseMoE``, found by its shape: quant sits below the model):
    stacked (E, N, K) expert parameters ``gate_up_proj`` and ``down_proj``."""
    return all(isinstance(getattr(m, a, None), nn.Parameter) and getattr(m, a).dim() == 3
               for a in ("gate_up_proj", "down_proj"))
