"""Rotary position embeddings: interleaved multimodal RoPE (text) and 2-D RoPE (vision).

Text (MRoPE): each token has three positions (t, h, w). Of the head_dim/2 rotary frequencies,
frequency i takes its angle from the h row when i % 3 == 1 and i < 3*section[1], from the w row
when i % 3 == 2 and i < 3*section[2], and from the t row otherwise ("interleaved" layout).

Vision: head_dim/4 frequencies; the rotated half is [row-index angles | column-index angles],
duplicated for the rotate-half pairing.
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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., D); cos/sin broadcastable to x, same dtype as x."""
    return x * cos + rotate_half(x) * sin


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

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (3, B, T) int -> cos, sin: (B, T, head_dim) in ``dtype``."""
        tab = self.tables.on(positions.device)
        # Pick, per frequency, the row that drives it, then scale by that frequency.
        per_freq = positions.float()[tab["axis"]]  # (D/2, B, T)
        angles = per_freq.permute(1, 2, 0) * tab["inv_freq"]  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)


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
