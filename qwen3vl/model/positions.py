"""Three-row (t, h, w) MRoPE position ids from ``input_ids`` and the vision grids alone.

Text tokens advance all three rows together. A vision block starting at position p with merged
grid (1, gh, gw) gets t = p, h = p + row, w = p + col, and the text after it resumes at
p + max(gh, gw). Videos are split by the processor into one block per temporal slice, so every
block has t = 1; a run of placeholder tokens is matched to the next grid(s) in order.
Left padding (attention_mask == 0) is skipped; padded slots get position 0.
"""
from __future__ import annotations

import torch


class PlaceholderMismatch(ValueError):
    """The placeholder tokens in input_ids do not match the vision grids."""


def _blocks(grid_thw: torch.Tensor | None, merge: int, split_time: bool) -> list[tuple[int, int]]:
    """Merged (gh, gw) of each vision block, in order; videos give one block per slice."""
    if grid_thw is None:
        return []
    out = []
    for t, h, w in grid_thw.tolist():
        out += [(h // merge, w // merge)] * (t if split_time else 1)
    return out


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of True in a 1-D bool tensor."""
    m = mask.to(torch.int8)
    edges = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def _place_block(pos: torch.Tensor, row_ids: torch.Tensor, row: int, cursor: int, end: int, p: int,
                 block: tuple[int, int] | None, kind: int, count: int, is_image: bool) -> tuple[int, int]:
    """Positions of one vision block (merged grid gh x gw) starting at ``cursor`` of a placeholder
    run ending at ``end``: t-row p, h-row p + row index, w-row p + column index, written into pos
    (3, n_real). -> (next text position, cursor after the block)."""
    if block is None:
        what = "image" if is_image else "video slice"
        raise PlaceholderMismatch(
            f"input_ids row {row} has more {what} placeholder blocks than the grids describe ({count - 1} given)"
        )
    gh, gw = block
    n = gh * gw
    if cursor + n > end or not bool((row_ids[cursor : cursor + n] == kind).all()):
        raise PlaceholderMismatch(
            f"input_ids row {row}: a placeholder run of {end - cursor} tokens does not match "
            f"the grid's {n} tokens ({gh}x{gw} after merging)"
        )
    rr = torch.arange(gh).repeat_interleave(gw)
    cc = torch.arange(gw).repeat(gh)
    pos[0, cursor : cursor + n] = p
    pos[1, cursor : cursor + n] = p + rr
    pos[2, cursor : cursor + n] = p + cc
    return p + max(gh, gw), cursor + n


def mrope_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids: (B, T) -> positions (3, B, T) long, next_position (B,) long.

    ``next_position`` is max position + 1 per row: the position of the first generated token
    (the reference's "rope delta" is next_position - number of real prompt tokens).
    """
    b, t = input_ids.shape
    ids = input_ids.cpu()
    keep = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    queues = {
        image_token_id: iter(_blocks(image_grid_thw, spatial_merge_size, split_time=False)),
        video_token_id: iter(_blocks(video_grid_thw, spatial_merge_size, split_time=True)),
    }
    counts = {image_token_id: 0, video_token_id: 0}
    positions = torch.zeros(3, b, t, dtype=torch.long)
    next_pos = torch.zeros(b, dtype=torch.long)
    for row in range(b):
        real = keep[row].nonzero().flatten()  # slots holding real tokens
        row_ids = ids[row, real]
        pos = torch.empty(3, len(real), dtype=torch.long)
        cursor, p = 0, 0  # cursor: index into real tokens; p: next text position
        vision = (row_ids == image_token_id) | (row_ids == video_token_id)
        for start, end in _runs(vision):
            n_text = start - cursor
            pos[:, cursor:start] = torch.arange(p, p + n_text)
            p += n_text
            cursor = start
            while cursor < end:
                kind = int(row_ids[cursor])
                counts[kind] += 1
                p, cursor = _place_block(pos, row_ids, row, cursor, end, p, next(queues[kind], None), kind,
                                         counts[kind], kind == image_token_id)
        pos[:, cursor:] = torch.arange(p, p + len(real) - cursor)
        positions[:, row, real] = pos
        next_pos[row] = int(pos.max()) + 1 if len(real) else 0
    return positions.to(input_ids.device), next_pos.to(input_ids.device)
