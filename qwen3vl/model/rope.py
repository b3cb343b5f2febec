"""Rotary position embeddings: interleaved multimodal RoPE (text) and 2-D RoPE (vision).

Text (MRoPE): each token has three positions (t, h, w). Of the head_dim/2 rotary frequencies,
frequency i takes its angle from the h row when i % 3 == 1 and i < 3*section[1], from the w row
when i % 3 == 2 and i < 3*section[2], and from the t row otherwise ("interleaved" layout).

Vision: head_dim/4 frequencies; the rotated half is [row-index angles | column-index angles],
duplicated for the rotate-half pairing.

Applying the rotation is an op of ``qwen3vl.kernels`` (``reference.apply_rotary`` /
``rms_norm_rope`` / ``vision_rope``); this module builds the cos/sin tables.
"""
from __future__ import annotations

import torch


def inverse_frequencies(dim: int, theta: float, device=None) -> torch.Tensor:
    """Standard RoPE inverse frequencies for a rotary dimension ``dim``: (dim/2,) float32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


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

    def __init__(self, head_dim: int, theta: float, section: tuple[int, int, int]):
        self.tables = _Tables(inv_freq=inverse_frequencies(head_dim, theta, "cpu"),
                              axis=mrope_axis_map(head_dim, tuple(section), "cpu"))
        self._text: dict = {}  # (device, dtype) -> cos, sin (positions, head_dim) for text tokens

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (3, B, T) int -> cos, sin: (B, T, head_dim) in ``dtype``."""
        tab = self.tables.on(positions.device)
        # Pick, per frequency, the row that drives it, then scale by that frequency.
        per_freq = positions.float()[tab["axis"]]  # (D/2, B, T)
        angles = per_freq.permute(1, 2, 0) * tab["inv_freq"]  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)

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
            cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
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
