"""Splitting a Thinking model's output into reasoning and answer, as the text streams in.

Qwen3-VL Thinking templates end the prompt inside the reasoning (``<|im_start|>assistant\\n<think>\\n``),
so the output holds only the closing ``</think>``: everything before it is reasoning, everything
after it the answer. An output that never closes (cut by ``max_tokens``) is all reasoning. The
newline handling follows the template's own split of an assistant message (reasoning stripped of
newlines at both ends, the answer stripped of leading newlines), so a reply fed back into the
template renders as it was generated. A ``<think>`` the model writes itself at the very start is
dropped. The split depends only on the text, never on how it was cut into pieces: feeding the
output in one piece or byte by byte gives the same concatenated reasoning and answer.
"""
from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""

    def __iadd__(self, other: "Split") -> "Split":
        self.reasoning += other.reasoning
        self.content += other.content
        return self


class ReasoningParser:
    """``feed(text) -> Split`` per piece, ``finish() -> Split`` at the end (flushes held text)."""

    def __init__(self, starts_in_reasoning: bool = True):
        self.in_reasoning = starts_in_reasoning
        self._start = starts_in_reasoning  # still before any reasoning character
        self._held = ""                    # text that may be part of a marker or of stripped newlines
        self._content_started = False

    def feed(self, text: str) -> Split:
        out = Split()
        self._held += text
        while self._held:
            if not self.in_reasoning:
                out.content += self._content(self._held)
                self._held = ""
                break
            if self._start and not self._drop_opening():
                break
            cut = self._held.find(THINK_CLOSE)
            if cut < 0:
                keep = self._hold_length(self._held)
                out.reasoning += self._held[: len(self._held) - keep]
                self._held = self._held[len(self._held) - keep:]
                break
            out.reasoning += self._held[:cut].rstrip("\n")
            self._held = self._held[cut + len(THINK_CLOSE):]
            self.in_reasoning = False
        return out

    def finish(self) -> Split:
        held, self._held = self._held, ""
        if not self.in_reasoning:
            return Split(content=self._content(held))
        return Split(reasoning=held.rstrip("\n") if not self._start else held.lstrip("\n").rstrip("\n"))

    def _drop_opening(self) -> bool:
        """At the start: drop a leading newline and a self-written ``<think>``; False while undecided."""
        stripped = self._held.lstrip("\n")
        if not stripped or (len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped)):
            return False  # only newlines, or a possible "<think>" so far
        if stripped.startswith(THINK_OPEN):
            stripped = stripped[len(THINK_OPEN):].lstrip("\n")
            if not stripped:
                self._held = ""
                return False
        self._held, self._start = stripped, False
        return True

    @staticmethod
    def _hold_length(text: str) -> int:
        """Held back: a possible start of ``</think>``, or trailing newlines (stripped if it follows)."""
        marker = partial_suffix(text, THINK_CLOSE)
        body = text[: len(text) - marker]
        return marker + (len(body) - len(body.rstrip("\n")))

    def _content(self, text: str) -> str:
        if not self._content_started:
            text = text.lstrip("\n")
            self._content_started = bool(text)
        return text


def parse_reasoning(text: str, starts_in_reasoning: bool = True) -> Split:
    """The whole output at once (the same split the streaming parser produces)."""
    parser = ReasoningParser(starts_in_reasoning)
    out = parser.feed(text)
    out += parser.finish()
    return out


__all__ = ["ReasoningParser", "Split", "parse_reasoning", "partial_suffix", "THINK_OPEN", "THINK_CLOSE"]
