"""What a content part and a processing call may say, defined once for every layer.

The option names (qwen-vl-utils names) that one image / video part may carry, the per-call media
options (``Processor`` keywords, ``LLM``'s and the server's ``mm_processor_kwargs``), and
``parse_media_part``: the one reader of image / video parts, in the Qwen form
(``{"type": "image", "image": ...}``, also ``"url"`` / ``"path"``) and the OpenAI form
(``{"type": "image_url", "image_url": {"url": ...}}`` or ``"image_url": "..."``), used by the
processor's chat-message normalisation and by the server's request validation alike.
``check_media_options``: the one range check of their values against ``MediaLimits``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from .errors import MediaOptionError
from .limits import MediaLimits

# Keys that hold a part's source, in order of preference.
IMAGE_KEYS = ("image", "url", "path", "base64")
VIDEO_KEYS = ("video", "url", "path")
# Options one content part may carry.
IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = ("fps", "num_frames", "min_pixels", "max_pixels", "total_pixels", "resized_height",
                 "resized_width", "sample_fps")
# Options for all the media of one call / request (mm_processor_kwargs).
MEDIA_OPTIONS = ("fps", "num_frames", "min_pixels", "max_pixels", "total_pixels")
# Keywords of a Processor call that are processing options (any other goes to the chat template).
CALL_OPTIONS = MEDIA_OPTIONS + ("timeout",)

# Content part type -> media kind.
MEDIA_PART_TYPES = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}


@dataclass
class MediaPart:
    kind: str                      # "image" or "video"
    source: object                 # path / URL / data: URL / PIL / array / list of frames; None if absent
    key: str                       # where the source sits in the part: "image", "url", "image_url.url", ...
    options: dict = field(default_factory=dict)  # per-item options (IMAGE_OPTIONS / VIDEO_OPTIONS)


def part_type(part: dict) -> str | None:
    """A content part's type: its ``"type"``, else the first of image / video / text it has a key for."""
    return part.get("type") or next((k for k in ("image", "video", "text") if k in part), None)


def parse_media_part(part: dict) -> MediaPart | None:
    """An image or video content part in any accepted form -> ``MediaPart``; None for other parts.

    Options come from an OpenAI url object (``{"url": ..., "max_pixels": ...}``) and from the part
    itself, the part's own winning. Values are not checked here (the server checks their types).
    """
    ptype = part_type(part)
    kind = MEDIA_PART_TYPES.get(ptype)
    if kind is None:
        return None
    info: dict = {}
    if ptype.endswith("_url"):
        raw = part.get(ptype)
        if isinstance(raw, dict):
            info, source, key = raw, raw.get("url"), f"{ptype}.url"
        else:
            source, key = raw, ptype
    else:
        key = next((k for k in (IMAGE_KEYS if kind == "image" else VIDEO_KEYS) if part.get(k) is not None), kind)
        source = part.get(key)
        if key == "base64" and isinstance(source, str) and not source.startswith("data:"):
            source = f"data:{kind}/unknown;base64,{source}"  # transformers' raw-base64 form
    allowed = IMAGE_OPTIONS if kind == "image" else VIDEO_OPTIONS
    options = {k: src[k] for src in (info, part) for k in allowed if src.get(k) is not None}
    return MediaPart(kind, source, key, options)


# Frames per second (an option's fps / sample_fps): one frame an hour up to a thousand a second.
FPS_RANGE = (1 / 3600, 1000.0)
# Frame counts are clamped to MediaLimits.max_frames where they are used, so only a lower bound here.
FRAME_COUNT_OPTIONS = ("num_frames", "nframes", "min_frames", "max_frames")


def _ranges(limits: MediaLimits) -> dict[str, tuple[float, float, str]]:
    """option -> (lowest, highest, what bounds it)."""
    pixels = (1, limits.max_option_pixels, "max_option_pixels")
    out = {name: pixels for name in ("min_pixels", "max_pixels", "resized_height", "resized_width")}
    out["total_pixels"] = (1, limits.max_total_pixels, limits.total_pixels_name)
    out.update({name: (*FPS_RANGE, "") for name in ("fps", "sample_fps")})
    out.update({name: (1, math.inf, "") for name in FRAME_COUNT_OPTIONS})
    out["timeout"] = (1e-3, math.inf, "")
    return out


def _check_value(name: str, value, lo: float, hi: float, bound: str, err: dict) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and lo <= value <= hi
    if not ok:
        span = f">= {_show(lo)}" if hi == math.inf else f"in [{_show(lo)}, {_show(hi)}]"
        why = f" ({bound})" if bound else ""
        raise MediaOptionError(f"{name} must be a positive finite number {span}{why}, got {value!r}", **err)


def _show(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.6g}"


def check_media_options(options: dict, limits: MediaLimits, *, kind: str = "media", index: int | None = None,
                        source: object = None) -> None:
    """Refuse size / time options that are not finite numbers within their bounds (None: not given).

    ``fps`` may be a list (qwen-vl-utils' sample fps per video): each value is checked. Raises
    ``MediaOptionError`` naming the item, the option, its value and the bound.
    """
    err = dict(kind=kind, index=index, source=source)
    ranges = _ranges(limits)
    for name, value in options.items():
        if name not in ranges or value is None:
            continue
        for one in (value if name == "fps" and isinstance(value, (list, tuple)) else [value]):
            _check_value(name, one, *ranges[name], err)
    height, width = options.get("resized_height"), options.get("resized_width")
    if height is not None and width is not None and height * width > limits.max_option_pixels:
        raise MediaOptionError(f"resized_height x resized_width = {_show(height * width)} is over the limit "
                               f"{limits.max_option_pixels} (max_option_pixels)", **err)


__all__ = ["IMAGE_KEYS", "VIDEO_KEYS", "IMAGE_OPTIONS", "VIDEO_OPTIONS", "MEDIA_OPTIONS", "CALL_OPTIONS",
           "MediaPart", "part_type", "parse_media_part", "check_media_options", "FPS_RANGE"]
