"""What a content part and a processing call may say, defined once for every layer.

The option names (qwen-vl-utils names) that one image / video part may carry, the per-call media
options (``Processor`` keywords, ``LLM``'s and the server's ``mm_processor_kwargs``), and
``parse_media_part``: the one reader of image / video parts, in the Qwen form
(``{"type": "image", "image": ...}``, also ``"url"`` / ``"path"``) and the OpenAI form
(``{"type": "image_url", "image_url": {"url": ...}}`` or ``"image_url": "..."``), used by the
processor's chat-message normalisation and by the server's request validation alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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


__all__ = ["IMAGE_KEYS", "VIDEO_KEYS", "IMAGE_OPTIONS", "VIDEO_OPTIONS", "MEDIA_OPTIONS", "CALL_OPTIONS",
           "MediaPart", "part_type", "parse_media_part"]
