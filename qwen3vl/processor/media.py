"""Loading images and videos from whatever the user hands us.

Images: PIL images, numpy arrays, torch tensors, local paths, ``file://`` URLs, ``http(s)://``
URLs (urllib, with a timeout and a size cap) and ``data:...;base64,`` URLs.
Videos: a path/URL to a video file (decoded with PyAV, only the sampled frames are converted),
a list of frames (paths or images) or an array of frames.

Every failure raises a typed :class:`~qwen3vl.processor.errors.MediaError` naming the item.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from .errors import (EmptyMediaError, MediaDecodeError, MediaError, MediaFetchError,
                     MediaNotFoundError, UnsupportedMediaError)

DEFAULT_TIMEOUT = 10.0
MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024  # no single media item should be bigger than this


# --------------------------------------------------------------------------- raw bytes
def fetch_bytes_or_path(source: str, *, kind: str, index: int | None,
                        timeout: float = DEFAULT_TIMEOUT, max_bytes: int = MAX_DOWNLOAD_BYTES):
    """Resolve a string source to ``("path", str)`` for local files or ``("bytes", bytes)``."""
    err = dict(kind=kind, index=index, source=source)
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep:
            raise MediaDecodeError("malformed data: URL (no comma)", **err)
        try:
            if header.endswith(";base64"):
                return "bytes", base64.b64decode(payload, validate=False)
            return "bytes", urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise MediaDecodeError(f"invalid base64 payload: {exc}", **err) from None
    if source.startswith(("http://", "https://")):
        return "bytes", _download(source, timeout, max_bytes, err)
    path = urllib.parse.unquote(urllib.parse.urlparse(source).path) if source.startswith("file://") else source
    if not os.path.isfile(path):
        raise MediaNotFoundError("no such file", **err)
    if os.path.getsize(path) == 0:
        raise EmptyMediaError("file is empty (0 bytes)", **err)
    return "path", path


def _download(url: str, timeout: float, max_bytes: int, err: dict) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "qwen3vl"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise MediaFetchError(f"HTTP {exc.code} {exc.reason}", **err) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MediaFetchError(f"could not fetch URL: {reason}", **err) from None
    if len(data) > max_bytes:
        raise MediaFetchError(f"download larger than the {max_bytes} byte cap", **err)
    if not data:
        raise EmptyMediaError("URL returned no data", **err)
    return data


# --------------------------------------------------------------------------- images
def to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion that composites any transparency onto white (as the reference does)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_pil(array, *, kind: str = "image", index: int | None = None) -> Image.Image:
    """numpy/torch (H,W), (H,W,C) or (C,H,W); uint8 or float in [0, 1] -> PIL image."""
    if hasattr(array, "detach"):  # torch tensor, without importing torch here
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    err = dict(kind=kind, index=index, source=array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first -> channels-last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise UnsupportedMediaError(f"unsupported array shape {array.shape}", **err)
    if array.size == 0:
        raise EmptyMediaError("array has no pixels", **err)
    if np.issubdtype(array.dtype, np.floating):
        # floats are taken as [0, 1] images, like the reference's rescale heuristic
        array = np.clip(np.round(array * 255.0), 0, 255)
    return Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))


def load_image(source, *, index: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> Image.Image:
    """Any supported image source -> RGB PIL image (EXIF orientation applied to files/URLs)."""
    err = dict(kind="image", index=index, source=source)
    if isinstance(source, Image.Image):
        # Already-decoded images are taken as they are (the reference does not re-orient them).
        return to_rgb(source)
    if isinstance(source, (str, os.PathLike)):
        how, value = fetch_bytes_or_path(os.fspath(source), kind="image", index=index, timeout=timeout)
        try:
            image = Image.open(value if how == "path" else io.BytesIO(value))
            image.load()  # decode now so truncated files fail here, with the item named
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise MediaDecodeError(f"not a readable image: {exc}", **err) from None
        return to_rgb(image)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise EmptyMediaError("empty bytes", **err)
        try:
            image = Image.open(io.BytesIO(source))
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as exc:
            raise MediaDecodeError(f"not a readable image: {exc}", **err) from None
        return to_rgb(image)
    if isinstance(source, np.ndarray) or hasattr(source, "detach"):
        return to_rgb(array_to_pil(source, kind="image", index=index))
    raise UnsupportedMediaError(f"unsupported image input of type {type(source).__name__}", **err)


# --------------------------------------------------------------------------- videos
@dataclass
class VideoClip:
    """Decoded, already-sampled frames of one video plus what we know of its timing."""

    frames: np.ndarray                  # (T, H, W, 3) uint8
    fps: float                          # frames per second of ``indices``' time base
    total_frames: int                   # frames in the source
    indices: list[int] = field(default_factory=list)  # source frame index of each kept frame


FrameSampler = Callable[[int, float], Sequence[int]]  # (total_frames, fps) -> indices to keep


def load_video(source, sampler: FrameSampler, *, index: int | None = None, sample_fps: float = 2.0,
               timeout: float = DEFAULT_TIMEOUT) -> VideoClip:
    """Any supported video source -> :class:`VideoClip` of the frames ``sampler`` picks.

    Lists of frames and frame arrays are taken as already sampled (qwen-vl-utils semantics):
    every frame is kept and frame ``i`` is at time ``i / sample_fps``.
    """
    err = dict(kind="video", index=index, source=source)
    if isinstance(source, (list, tuple)):
        if not source:
            raise EmptyMediaError("empty list of frames", **err)
        images = [load_image(f, index=index, timeout=timeout) for f in source]
        size = images[0].size
        # frames of one video must share a size; odd ones are brought to the first frame's size
        images = [im if im.size == size else im.resize(size, Image.BICUBIC) for im in images]
        frames = np.stack([np.asarray(im) for im in images])
        return VideoClip(frames, float(sample_fps), len(images), list(range(len(images))))
    if isinstance(source, np.ndarray) or hasattr(source, "detach"):
        frames = _frames_from_array(source, err)
        return VideoClip(frames, float(sample_fps), len(frames), list(range(len(frames))))
    if isinstance(source, (str, os.PathLike)):
        how, value = fetch_bytes_or_path(os.fspath(source), kind="video", index=index, timeout=timeout)
        return _decode_video(value if how == "path" else io.BytesIO(value), sampler, err)
    raise UnsupportedMediaError(f"unsupported video input of type {type(source).__name__}", **err)


def _frames_from_array(array, err: dict) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 4:
        raise UnsupportedMediaError(f"video arrays must be 4-D (T,H,W,C) or (T,C,H,W), got {array.shape}", **err)
    if array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 1, -1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] != 3 or array.shape[0] == 0:
        raise UnsupportedMediaError(f"unsupported video array shape {array.shape}", **err)
    if np.issubdtype(array.dtype, np.floating):
        # [0, 1] floats are scaled; floats over 1 are 0..255 values (qwen-vl-utils' float videos)
        array = np.clip(np.round(array if array.max(initial=0.0) > 1.0 else array * 255.0), 0, 255)
    return np.ascontiguousarray(array.astype(np.uint8))


def _open_container(target, err: dict):
    import av  # imported lazily: image-only use never pays for FFmpeg

    if hasattr(target, "seek"):
        target.seek(0)
    try:
        container = av.open(target)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaDecodeError(f"not a readable video: {exc}", **err) from None
    if not container.streams.video:
        container.close()
        raise MediaDecodeError("no video stream in the file", **err)
    return container


def _probe(target, err: dict) -> tuple[int, float]:
    """(frame count, fps) of the first video stream; counts packets when the header has no count."""
    container = _open_container(target, err)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 24.0
        total = int(stream.frames or 0)
        if total <= 0:
            total = sum(1 for p in container.demux(stream) if p.size > 0)
    except Exception as exc:  # av raises many error types for broken streams
        raise MediaDecodeError(f"cannot read video stream: {exc}", **err) from None
    finally:
        container.close()
    if total <= 0:
        raise EmptyMediaError("video has no frames", **err)
    return total, fps


def _decode_frames(target, wanted: Sequence[int], err: dict) -> tuple[dict[int, np.ndarray], int]:
    """Decode sequentially, converting only the wanted frames; returns (frames, frames seen)."""
    wanted_set, last = set(wanted), max(wanted)
    container = _open_container(target, err)
    kept: dict[int, np.ndarray] = {}
    seen = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if seen in wanted_set:
                kept[seen] = frame.to_ndarray(format="rgb24")
            seen += 1
            if seen > last:
                break
    except Exception as exc:
        if not kept:
            raise MediaDecodeError(f"cannot decode video: {exc}", **err) from None
        # a truncated tail: keep what decoded, the caller re-samples over the frames seen
    finally:
        container.close()
    return kept, seen


def _decode_video(target, sampler: FrameSampler, err: dict) -> VideoClip:
    total, fps = _probe(target, err)
    indices = [int(i) for i in sampler(total, fps)]
    kept, seen = _decode_frames(target, indices, err)
    if seen == 0:
        raise EmptyMediaError("no decodable frames", **err)
    if len(kept) < len(set(indices)):
        # header over-counted (truncated file): sample again over the frames that really exist
        total = seen
        indices = [int(i) for i in sampler(total, fps)]
        kept, seen = _decode_frames(target, indices, err)
        if len(kept) < len(set(indices)):
            raise MediaDecodeError("video is truncated and frames could not be decoded", **err)
    frames = np.stack([kept[i] for i in indices])  # (T, H, W, 3) uint8; repeated indices repeat frames
    return VideoClip(frames, fps, total, indices)


__all__ = ["MediaError", "VideoClip", "load_image", "load_video", "to_rgb", "array_to_pil",
           "fetch_bytes_or_path"]
