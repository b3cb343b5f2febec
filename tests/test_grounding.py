"""``qwen3vl.grounding``: boxes and points out of answers, in the forms Qwen3-VL writes them."""
from __future__ import annotations

from PIL import Image

from qwen3vl import grounding
from qwen3vl.grounding import Grounding

FENCED = """Here you go:
```json
[
  {"bbox_2d": [100, 200, 300, 400], "label": "cat"},
  {"point_2d": [500, 500], "label": "nose"}
]
```
Anything else?"""


def test_fenced_list_with_text_around():
    items = grounding.parse(FENCED)
    assert items == [Grounding("box", (100.0, 200.0, 300.0, 400.0), "cat"),
                     Grounding("point", (500.0, 500.0), "nose")]


def test_cut_list_keeps_complete_objects_and_nested_ones():
    cut = '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7'
    assert [i.label for i in grounding.parse(cut)] == ["a"]
    nested = '{"objects": [{"point_2d": [10, 20], "label": "x", "score": 0.9}], "note": "ok"}'
    (item,) = grounding.parse(nested)
    assert item.kind == "point" and item.extra == (("score", 0.9),)


def test_malformed_and_swapped_corners():
    assert grounding.parse('{"bbox_2d": [1, 2, 3]} {"bbox_2d": "x"} {"point_2d": [true, 1]} nothing') == []
    (box,) = grounding.parse('{"bbox_2d": [300, 400, 100, 200]}')
    assert box.coords == (100.0, 200.0, 300.0, 400.0) and box.label == ""


def test_to_pixels_scales_and_clamps():
    items = grounding.parse('[{"bbox_2d": [0, 0, 500, 1000]}, {"point_2d": [1000, 1200]}]')
    box, point = grounding.to_pixels(items, 640, 480)
    assert box.coords == (0.0, 0.0, 320.0, 480.0)
    assert point.coords == (640.0, 480.0)  # past the grid: clamped to the image


def test_draw_marks_the_image():
    image = Image.new("RGB", (200, 100), "black")
    boxes = grounding.to_pixels(grounding.parse(FENCED), *image.size)
    out = grounding.draw(image, boxes)
    assert out.size == image.size and out is not image
    assert out.getpixel((20, 30)) != (0, 0, 0)          # the box's left edge: x = 100/1000 * 200, y in [20, 40]
    assert out.getpixel((100, 50)) != (0, 0, 0)         # the point
    assert image.getpixel((20, 30)) == (0, 0, 0)        # the original is untouched
