"""How ``qwen3vl chat`` shows a reply: a Thinking model's reasoning before the answer (dimmed on a
terminal, or left out), and the boxes / points of a grounding answer drawn on the image asked about.

Used only by ``qwen3vl.cli``.
"""
from __future__ import annotations

from typing import TextIO

from PIL import Image, ImageOps

from . import grounding

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ReplyPrinter:
    """Writes streamed deltas to ``out``: reasoning pieces first (``show_reasoning``; wrapped in
    ANSI dim when ``dim``), then a blank line, then the answer pieces."""

    def __init__(self, out: TextIO, show_reasoning: bool = True, dim: bool = False):
        self.out, self.show_reasoning, self.dim = out, show_reasoning, dim
        self._in_reasoning = False  # a reasoning block is open on the output

    def write(self, delta) -> None:
        if delta.reasoning and self.show_reasoning:
            if not self._in_reasoning:
                self.out.write(DIM if self.dim else "")
                self._in_reasoning = True
            self.out.write(delta.reasoning)
        if delta.text:
            self._close_reasoning("\n\n")
            self.out.write(delta.text)
        self.out.flush()

    def finish(self) -> None:
        """Ends the reply (closes an unfinished reasoning block, then a newline)."""
        self._close_reasoning("")
        self.out.write("\n")
        self.out.flush()

    def _close_reasoning(self, separator: str) -> None:
        if self._in_reasoning:
            self.out.write((RESET if self.dim else "") + separator)
            self._in_reasoning = False


def save_boxes(image_path: str, answer: str, out_path: str) -> int:
    """Draws the boxes and points found in ``answer`` (0-1000 grid) on a copy of the image at
    ``image_path`` (original resolution, EXIF orientation applied as the model saw it) and saves it
    to ``out_path``. Returns how many were drawn; with none found nothing is written."""
    items = grounding.parse(answer)
    if not items:
        return 0
    with Image.open(image_path) as image:
        upright = ImageOps.exif_transpose(image)
        pixels = grounding.to_pixels(items, *upright.size)
        grounding.draw(upright, pixels).save(out_path)
    return len(items)


def boxes_message(count: int, out_path: str) -> str:
    """The line ``qwen3vl chat --boxes`` prints after the answer."""
    if count == 0:
        return f"[no boxes or points found in the answer: {out_path} not written]"
    return f"[{count} box{'' if count == 1 else 'es'} / point{'' if count == 1 else 's'} drawn: {out_path}]"


__all__ = ["ReplyPrinter", "save_boxes", "boxes_message", "DIM", "RESET"]
