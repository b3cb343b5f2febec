"""Per-sequence stop conditions: stop token ids, stop strings and the new-token budget.

Stop strings are matched on the detokenized text, so one may span several tokens. The text handed back never
contains the stop string or anything after it (like the OpenAI API and vLLM). While streaming, the tail of the text
that could still grow into a stop string is held back until it either completes one (and is dropped) or stops
matching (and is released), so a partial match is never emitted early.
"""
from __future__ import annotations

from typing import NamedTuple

from .sampling_params import SamplingParams


class StopResult(NamedTuple):
    text: str  # text that may be emitted now (possibly empty)
    finished: bool
    finish_reason: str | None  # "stop", "length", or None while running


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Start of the earliest stop-string occurrence in ``text``, or None."""
    starts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(starts) if starts else None


def _partial_stop_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class StopChecker:
    """Decides, token by token, when one sequence is finished and which text may be emitted.

    ``update(token_id, text_delta)`` is called once per generated token with the text that token added to the
    detokenized output. A stop token id or a stop string ends the sequence with "stop" (the stop token's text and
    the stop string are not emitted); reaching ``max_new_tokens`` ends it with "length" (a stop on that same token
    wins). Before ``min_new_tokens`` tokens have been generated no stop condition applies. Stop token ids left
    unset in ``params`` are the last-resort ones (``SamplingParams.stop_ids``); the engine fills in the checkpoint's.
    """

    def __init__(self, params: SamplingParams):
        self.stop_token_ids = frozenset(params.stop_ids)
        self.stop = params.stop
        self.max_new_tokens = params.max_new_tokens
        self.min_new_tokens = params.min_new_tokens
        self.num_tokens = 0
        self.text = ""  # everything emitted so far
        self.finish_reason: str | None = None
        self._held = ""  # tail that may be the start of a stop string

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, token_id: int, text_delta: str) -> StopResult:
        if self.finished:
            raise RuntimeError(f"sequence already finished ({self.finish_reason})")
        self.num_tokens += 1
        can_stop = self.num_tokens >= self.min_new_tokens
        if can_stop and token_id in self.stop_token_ids:
            return self._finish(self._held, "stop")
        text = self._held + text_delta
        # Any occurrence completed by this token starts inside `text`: everything before it was released only
        # because it could not begin a stop string.
        cut = _first_stop(text, self.stop) if can_stop else None
        if cut is not None:
            return self._finish(text[:cut], "stop")
        if self.num_tokens >= self.max_new_tokens:
            return self._finish(text, "length")
        split = len(text) - _partial_stop_length(text, self.stop)
        self._held = text[split:]
        return self._emit(text[:split])

    def _finish(self, text: str, reason: str) -> StopResult:
        self.finish_reason = reason
        self._held = ""
        return self._emit(text)

    def _emit(self, text: str) -> StopResult:
        self.text += text
        return StopResult(text, self.finished, self.finish_reason)
