"""Rotary position embeddings: interleaved multimodal RoPE (text) and 2-D RoPE (vision).

Text (MRoPE): each token has three positions (t, h, w). Of the head_dim/2 rotary frequencies,
frequency i takes its angle from the h row when i % 3 == 1 and i < 3*section[1], from the w row
when i % 3 == 2 and i < 3*section[2], and from the t row otherwise ("interleaved" layout).

Vision: head_dim/4 frequencies; the rotated half is [row-index angles | column-index angles],
duplicated for the rotate-half pairing.

YaRN (``rope_type: "yarn"``, ``yarn``): the shared inverse frequencies blend interpolation (divided
by ``factor``) and extrapolation over a correction range, and cos and sin are both multiplied by an
attention factor, before the interleaved t/h/w assignment, as the pinned reference does.

Applying the rotation is an op of ``qwen3vl.kernels`` (``reference.apply_rotary`` /
``rms_norm_rope`` / ``vision_rope``); this module builds the cos/sin tables.
"""
from __future__ import annotations

import math

import torch

from ..config import RopeScaling


def inverse_frequencies(dim: int, theta: float, device=None) -> torch.Tensor:
    """Standard RoPE inverse frequencies for a rotary dimension ``dim``: (dim/2,) float32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def yarn_attention_factor(s: RopeScaling) -> float:
    """The cos/sin multiplier: given, or 0.1 * mscale * ln(factor) + 1 (the ratio of two such terms
    with ``mscale`` and ``mscale_all_dim``). The pinned reference (transformers 5, after its
    PR 40320) uses the explicit ``factor``: 1.109861 for the official 1M-token config (factor 3).
    Older transformers derived it from max_position_embeddings / original instead (the README's
    1000000 / 262144 = 3.8147 there, giving 1.1339)."""
    if s.attention_factor is not None:
        return s.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.mscale and s.mscale_all_dim:
        return float(mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim))
    return mscale(s.factor)


def yarn(dim: int, theta: float, s: RopeScaling, device="cpu") -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies (dim/2,) float32 and the attention factor, computed as the
    reference's ``_compute_yarn_parameters`` (same float32 ops in the same order)."""

    def correction_dim(rotations: float) -> float:  # the dimension that turns ``rotations`` times
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation = 1 - ramp  # 1: keep the original frequency (fast dimensions), 0: interpolate
    inv_freq = (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, yarn_attention_factor(s)


def text_inverse_frequencies(dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """(inv_freq (dim/2,) float32, attention factor) of the text decoder, on the CPU."""
    if scaling is None:
        return inverse_frequencies(dim, theta, "cpu"), 1.0
    return yarn(dim, theta, scaling, "cpu")


def mrope_axis_map(head_dim: int, section: tuple[int, int, int], device=None) -> torch.Tensor:
    """For each of the head_dim/2 frequencies, which position row (0=t, 1=h, 2=w) drives it."""
    axis = torch.zeros(head_dim // 2, dtype=torch.long, device=device)
    for row, offset in ((1, 1), (2, 2)):
        axis[offset : 3 * section[row] : 3] = row
    return axis


class _Tables:
    """Small float32 tables kept OUT of the module's buffers: built on the CPU at construction
    (even inside a meta-device context), so a meta-built model never has uninitialised angles,
    and never cast by ``model.to(bfloat16)``. Moved to a device lazily, once."""

    def __init__(self, **tables: torch.Tensor):
        self._cpu = tables
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._on:
            self._on[device] = {k: v.to(device) for k, v in self._cpu.items()}
        return self._on[device]


class TextRope:
    """cos/sin tables for 3-row (t, h, w) positions, interleaved as in the reference."""

    def __init__(self, head_dim: int, theta: float, section: tuple[int, int, int],
                 scaling: RopeScaling | None = None):
        inv_freq, self.attention_factor = text_inverse_frequencies(head_dim, theta, scaling)
        self.tables = _Tables(inv_freq=inv_freq, axis=mrope_axis_map(head_dim, tuple(section), "cpu"))
        self._text: dict = {}  # (device, dtype) -> cos, sin (positions, head_dim) for text tokens

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (3, B, T) int -> cos, sin: (B, T, head_dim) in ``dtype``."""
        tab = self.tables.on(positions.device)
        # Pick, per frequency, the row that drives it, then scale by that frequency.
        per_freq = positions.float()[tab["axis"]]  # (D/2, B, T)
        angles = per_freq.permute(1, 2, 0) * tab["inv_freq"]  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
        return self._cos_sin(angles, dtype)

    def _cos_sin(self, angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 angles -> cos, sin in ``dtype``, scaled in float32 first (YaRN) as the reference."""
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def text(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens, whose three rows are equal: positions (B, T) int -> cos, sin (B, T, head_dim),
        the values ``__call__`` gives for the stacked rows, looked up in a table of every position
        so far (decode steps: two gathers instead of eight small ops)."""
        n = int(positions.max()) + 1
        key = (positions.device, dtype)
        cos, sin = self._text.get(key, (None, None))
        if cos is None or cos.shape[0] < n:
            size = max(1024, 1 << (n - 1).bit_length())  # grows by doubling
            angles = torch.arange(size, device=positions.device, dtype=torch.float32)[:, None] \
                * self.tables.on(positions.device)["inv_freq"]  # (size, D/2)
            angles = torch.cat((angles, angles), dim=-1)  # (size, D)
            cos, sin = self._cos_sin(angles, dtype)
            self._text[key] = (cos, sin)
        return cos[positions], sin[positions]


class VisionRope:
    """cos/sin for patches with (row, col) positions; computed in float32."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        self.tables = _Tables(inv_freq=inverse_frequencies(head_dim // 2, theta, "cpu"))

    def __call__(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows, cols: (N,) -> cos, sin: (N, head_dim) float32."""
        inv = self.tables.on(rows.device)["inv_freq"]
        angles = torch.cat((rows.float()[:, None] * inv, cols.float()[:, None] * inv), dim=-1)  # (N, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (N, D)
        return angles.cos(), angles.sin()
