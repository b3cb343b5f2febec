"""A prompt being prefilled piece by piece (chunked prefill).

Everything the decoder needs for the positions still to prefill is computed once, when the
request is admitted: the input embeddings with the vision features merged in, the MRoPE
positions, where the visual tokens are and their DeepStack features. ``take(n)`` then hands out
the next n positions' share of each, so a long prompt (a video: thousands of tokens) runs through
the decoder in several forward calls, between which the engine decodes the running requests.
Chunks see every earlier position through the KV cache, so the result equals a one-piece
prefill up to the summation order inside attention. Before that, a long video is run through the
vision encoder a few frames at a time (``Admitted.prepared``), with decode steps in between.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .prefix_cache import SequenceKeys
from .request import Request


@dataclass
class Chunk:
    start: int                        # cache index of the chunk's first token
    embeds: torch.Tensor              # (1, n, H)
    positions: torch.Tensor           # (3, 1, n) MRoPE positions
    visual_mask: torch.Tensor | None  # (1, n) bool, None when the chunk holds no visual token
    deepstack: list                   # per DeepStack layer (n_visual in the chunk, H)


@dataclass
class PendingPrefill:
    req: Request
    pos: int                          # cache index of the next position to prefill
    embeds: torch.Tensor              # (1, T - pos0, H) for the positions not prefilled at admission
    positions: torch.Tensor           # (3, 1, T - pos0)
    visual_mask: torch.Tensor | None  # (1, T - pos0) bool
    deepstack: list                   # per DeepStack layer (n_visual, H), in token order
    next_position: torch.Tensor       # (1,) MRoPE position of the first generated token
    keys: SequenceKeys | None = None  # prefix-cache keys of the prompt (None: not cached)
    _done: int = 0                    # positions of ``embeds`` already handed out
    _visual_done: int = 0             # visual tokens among them

    @property
    def remaining(self) -> int:
        return self.embeds.shape[1] - self._done

    def take(self, n: int) -> Chunk:
        """The next min(n, remaining) positions."""
        a, b = self._done, min(self._done + n, self.embeds.shape[1])
        mask, deepstack = None, []
        if self.visual_mask is not None:
            mask = self.visual_mask[:, a:b]
            n_visual = int(mask.sum())
            v0, v1 = self._visual_done, self._visual_done + n_visual
            deepstack = [d[v0:v1] for d in self.deepstack] if n_visual else []
            self._visual_done = v1
            if not n_visual:
                mask = None
        chunk = Chunk(self.pos, self.embeds[:, a:b], self.positions[:, :, a:b], mask, deepstack)
        self._done, self.pos = b, self.pos + (b - a)
        return chunk


@dataclass
class Admitted:
    """The request being prefilled: first its media are encoded (``prep``, a generator that yields
    between encoder pieces and returns the ``PendingPrefill``), then its chunks run."""

    req: Request
    prep: Iterator | None = None
    pending: PendingPrefill | None = None
    start: int = 0     # cache index where its prefill starts (after a reused prefix)
    decoding: int = 0  # requests decoding beside it this step (sets the pieces' size)

    @property
    def pos(self) -> int:
        """Cache index of the next position to prefill."""
        return self.start if self.pending is None else self.pending.pos

    def prepared(self) -> bool:
        """Run the encoder's next piece (all of them when nobody is decoding) -> whether the
        prompt is ready for its chunks."""
        while self.pending is None:
            try:
                next(self.prep)
            except StopIteration as done:
                self.pending, self.prep = done.value, None
                break
            if self.decoding:
                return False
        return True


# Alone, a prompt is still prefilled in pieces of at most this many tokens: activations (the MLP's
# are ~37 KB per token on the 2B in bf16) then stay bounded however long the prompt.
ALONE_CHUNK = 8192


def chunk_size(budget: int, decoding: int, remaining: int) -> int:
    """How many prompt positions one engine step prefills: up to ``ALONE_CHUNK`` when no other
    request is decoding (nobody waits for it, and large pieces are fastest), else what the
    per-step token budget leaves beside one token per decoding request (at least 16, so the
    prompt progresses)."""
    if not decoding:
        return min(remaining, max(budget, ALONE_CHUNK))
    return min(remaining, max(16, budget - decoding))
