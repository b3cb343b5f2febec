"""Typed errors raised while turning user media into model inputs.

Every error is a ``ValueError`` (so callers that only know the generic contract still catch it)
and names the item it concerns: its kind, its index in the request and a short form of its source.
"""
from __future__ import annotations


class MediaError(ValueError):
    """Base class: an image or video in the request could not be used."""

    def __init__(self, reason: str, *, kind: str = "media", index: int | None = None, source: object = None):
        self.reason = reason
        self.kind = kind
        self.index = index
        self.source = describe_source(source)
        where = kind if index is None else f"{kind} #{index}"
        if self.source:
            where += f" ({self.source})"
        super().__init__(f"{where}: {reason}")


class MediaNotFoundError(MediaError):
    """A local path (or file:// URL) that does not exist or cannot be read."""


class MediaFetchError(MediaError):
    """A remote URL that could not be fetched (refused, timed out, HTTP error, too large)."""


class MediaDecodeError(MediaError):
    """Bytes that are not a decodable image/video: corrupt, truncated, wrong format."""


class EmptyMediaError(MediaDecodeError):
    """A zero-length file or a video without any decodable frame."""


class UnsupportedMediaError(MediaError):
    """An input of a type or layout we do not know how to read."""


class ImageSizeError(MediaError):
    """Image geometry the model cannot take (aspect ratio over 200, zero size)."""


class MediaOptionError(ImageSizeError):
    """A size / sampling option (``max_pixels``, ``fps``, ``num_frames``...) that is not a finite
    number in its range. An ``ImageSizeError`` too: that is what bad pixel options raised before."""


class MediaLimitError(MediaError):
    """An item over a :class:`~qwen3vl.processor.limits.MediaLimits` bound (pixels, frames, item
    count, bytes, time); the message names the bound and its value."""


class ForbiddenURLError(MediaFetchError):
    """A URL the fetcher refuses to follow: another scheme, a private / loopback address, a host
    outside ``allowed_domains``, too many redirects."""


def describe_source(source: object, limit: int = 80) -> str:
    """A short, printable description of a media source (never dumps base64 payloads)."""
    if source is None:
        return ""
    if isinstance(source, str):
        if source.startswith("data:"):
            return source[: source.find(",") + 1 if "," in source else 30][:40] + "..."
        return source if len(source) <= limit else source[: limit - 3] + "..."
    if isinstance(source, (list, tuple)):
        return f"list of {len(source)} frames"
    shape = getattr(source, "shape", None)
    if shape is not None:
        return f"{type(source).__name__} of shape {tuple(shape)}"
    size = getattr(source, "size", None)
    mode = getattr(source, "mode", None)
    if mode is not None:
        return f"PIL image {mode} {size}"
    return type(source).__name__
