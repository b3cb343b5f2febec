"""Boxes and points in a Qwen3-VL answer, mapped to the pixels of the original image.

Qwen3-VL grounds in coordinates relative to a 0-1000 grid over the image it was shown, usually as
JSON in a code fence: ``[{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}, {"point_2d": [x, y], ...}]``.
``parse`` finds every such object anywhere in the text (fenced or not, with text around it, a
list cut short by ``max_tokens``: each complete object counts); ``to_pixels`` scales them to an
image's size (value / 1000 x width or height, clamped to the image); ``draw`` returns an
annotated copy of the image.

    answer = llm.chat(messages).text
    boxes = grounding.to_pixels(grounding.parse(answer), *image.size)
    grounding.draw(image, boxes).save("out.png")
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

GRID = 1000.0  # Qwen3-VL's relative coordinate range
_DECODER = json.JSONDecoder()
_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]


@dataclass(frozen=True)
class Grounding:
    kind: str                       # "box" or "point"
    coords: tuple[float, ...]       # box: (x1, y1, x2, y2); point: (x, y)
    label: str = ""
    extra: tuple = ()               # other keys of the object, as (key, value) pairs


def _numbers(value, count: int) -> tuple[float, ...] | None:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return tuple(float(v) for v in value)


def _from_object(obj: dict) -> Grounding | None:
    label = obj.get("label", obj.get("text", ""))
    label = label if isinstance(label, str) else json.dumps(label, ensure_ascii=False)
    extra = tuple((k, v) for k, v in obj.items() if k not in ("bbox_2d", "bbox", "point_2d", "point", "label"))
    box = _numbers(obj.get("bbox_2d", obj.get("bbox")), 4)
    if box is not None:
        x1, y1, x2, y2 = box
        return Grounding("box", (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), label, extra)
    point = _numbers(obj.get("point_2d", obj.get("point")), 2)
    return None if point is None else Grounding("point", point, label, extra)


def parse(text: str) -> list[Grounding]:
    """Every box / point object in ``text``, in order (nested lists and fences included)."""
    found, pos = [], 0
    while True:
        start = text.find("{", pos)
        if start < 0:
            return found
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1  # not a complete object here: look at the next brace
            continue
        item = _from_object(obj) if isinstance(obj, dict) else None
        if item is not None:
            found.append(item)
        pos = end if item is not None else start + 1


def to_pixels(items: list[Grounding], width: int, height: int) -> list[Grounding]:
    """0-1000 coordinates -> pixels of a ``width`` x ``height`` image (clamped to it)."""
    def scale(coords):
        out = []
        for i, v in enumerate(coords):
            size = width if i % 2 == 0 else height
            out.append(min(max(v / GRID * size, 0.0), float(size)))
        return tuple(out)
    return [replace(item, coords=scale(item.coords)) for item in items]


def draw(image: Image.Image, items: list[Grounding], width: int | None = None) -> Image.Image:
    """A copy of ``image`` with pixel-coordinate ``items`` drawn (boxes, points, their labels)."""
    out = image.convert("RGB")
    pen = ImageDraw.Draw(out)
    line = width or max(2, round(min(out.size) / 200))
    for i, item in enumerate(items):
        color = _COLORS[i % len(_COLORS)]
        if item.kind == "box":
            pen.rectangle(item.coords, outline=color, width=line)
            anchor = item.coords[:2]
        else:
            x, y = item.coords
            r = 2 * line
            pen.ellipse((x - r, y - r, x + r, y + r), fill=color, outline="white")
            anchor = (x + r, y - r)
        if item.label:
            left, top, right, bottom = pen.textbbox(anchor, item.label)
            pen.rectangle((left, top, right, bottom), fill=color)
            pen.text(anchor, item.label, fill="white")
    return out


__all__ = ["Grounding", "parse", "to_pixels", "draw", "GRID"]
