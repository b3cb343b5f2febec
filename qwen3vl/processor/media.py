"""Loading images and videos from whatever the user hands us, within ``MediaLimits``.

Images: PIL images, numpy arrays, torch tensors, local paths, ``file://`` URLs, ``http(s)://``
URLs and ``data:`` URLs (bytes from :mod:`~qwen3vl.processor.fetch`). Encoded images are opened
with Pillow restricted to common formats; their size is read from the header and refused over
``max_image_pixels`` before any pixel is decoded.
Videos: a path/URL to a video file (PyAV; playlists refused, only common container formats and
no protocol but ``file``), a list of frames (paths or images) or an array of frames. The stream's
frame size is checked before decoding, at most ``max_frames`` frames are kept, and each kept frame
is brought to its final size as soon as it is decoded (``frame_size``), so memory holds one source
frame plus the output, never all frames at source size. Decoding stops at the call's deadline.

Every failure raises a typed :class:`~qwen3vl.processor.errors.MediaError` naming the item.
"""
from __future__ import annotations

import io
import os
import time
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import EmptyMediaError, MediaDecodeError, MediaError, MediaLimitError, UnsupportedMediaError
from .fetch import fetch_bytes_or_path
from .limits import MediaLimits
from .image import resize_frames
from .video import VideoClip

# Pillow decoders a request may reach (JPEG covers multi-picture MPO files too)
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

FrameSampler = Callable[[int, float], Sequence[int]]  # (total_frames, fps) -> indices to keep
FrameSize = Callable[[int, int, int], tuple[int, int]]  # (frames kept, height, width) -> final (height, width)


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


def decode_image(target, limits: MediaLimits, err: dict) -> Image.Image:
    """A path or file object -> decoded PIL image (EXIF orientation applied), size checked first."""
    try:
        image = Image.open(target, formats=IMAGE_FORMATS)  # lazy: reads the header only
    except Image.DecompressionBombError as exc:
        # Pillow's own bomb check (its global limit, left as it is) fired while reading the header
        raise MediaLimitError(f"image refused before decoding (max_image_pixels={limits.max_image_pixels}): {exc}",
                              **err) from None
    except UnidentifiedImageError:
        raise MediaDecodeError(f"not a readable image (unknown format; accepted: {', '.join(IMAGE_FORMATS)})",
                               **err) from None
    except Exception as exc:  # any plugin may fail on a crafted header
        raise MediaDecodeError(f"not a readable image: {exc}", **err) from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        image.close()
        raise MediaLimitError(f"{width}x{height} image ({width * height} pixels) is over max_image_pixels="
                              f"{limits.max_image_pixels}", **err)
    try:
        image.load()  # decode now so truncated files fail here, with the item named
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # decoders raise OSError, SyntaxError, NotImplementedError, struct.error...
        image.close()
        raise MediaDecodeError(f"not a readable image: {exc}", **err) from None


def load_image(source, *, index: int | None = None, timeout: float | None = None, limits: MediaLimits | None = None,
               deadline: float | None = None) -> Image.Image:
    """Any supported image source -> RGB PIL image (EXIF orientation applied to files/URLs).

    ``limits`` (default ``MediaLimits()``) bound what is fetched and decoded; ``deadline`` is the
    call's (``time.monotonic()`` value), ``timeout`` the per-read timeout of remote fetches.
    """
    limits = limits or MediaLimits()
    err = dict(kind="image", index=index, source=source)
    if isinstance(source, Image.Image):
        # Already-decoded images are taken as they are (the reference does not re-orient them).
        return to_rgb(source)
    if isinstance(source, (str, os.PathLike)):
        how, value = fetch_bytes_or_path(os.fspath(source), kind="image", index=index, limits=limits,
                                         deadline=deadline, timeout=timeout)
        return to_rgb(decode_image(value if how == "path" else io.BytesIO(value), limits, err))
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise EmptyMediaError("empty bytes", **err)
        return to_rgb(decode_image(io.BytesIO(source), limits, err))
    if isinstance(source, np.ndarray) or hasattr(source, "detach"):
        return to_rgb(array_to_pil(source, kind="image", index=index))
    raise UnsupportedMediaError(f"unsupported image input of type {type(source).__name__}", **err)


# --------------------------------------------------------------------------- videos
def load_video(source, sampler: FrameSampler, *, index: int | None = None, sample_fps: float = 2.0,
               timeout: float | None = None, limits: MediaLimits | None = None, deadline: float | None = None,
               frame_size: FrameSize | None = None) -> VideoClip:
    """Any supported video source -> :class:`VideoClip` of the frames ``sampler`` picks.

    Lists of frames and frame arrays are taken as already sampled (qwen-vl-utils semantics):
    every frame is kept and frame ``i`` is at time ``i / sample_fps``. With ``frame_size``, frames
    decoded here (files, URLs, lists of frames) come back at that size (``clip.resized``).
    """
    limits = limits or MediaLimits()
    deadline = time.monotonic() + limits.request_deadline_s if deadline is None else deadline
    err = dict(kind="video", index=index, source=source)
    if isinstance(source, (list, tuple)):
        if not source:
            raise EmptyMediaError("empty list of frames", **err)
        if len(source) > limits.max_frames:
            raise MediaLimitError(f"{len(source)} frames given, over max_frames={limits.max_frames}", **err)
        frames = _frames_from_list(source, index, frame_size, dict(timeout=timeout, limits=limits, deadline=deadline))
        return VideoClip(frames, float(sample_fps), len(frames), list(range(len(frames))), frame_size is not None)
    if isinstance(source, np.ndarray) or hasattr(source, "detach"):
        frames = _frames_from_array(source, err)
        return VideoClip(frames, float(sample_fps), len(frames), list(range(len(frames))))
    if isinstance(source, (str, os.PathLike)):
        how, value = fetch_bytes_or_path(os.fspath(source), kind="video", index=index, limits=limits,
                                         deadline=deadline, timeout=timeout)
        return decode_video(value if how == "path" else io.BytesIO(value), sampler, err, limits=limits,
                            deadline=deadline, frame_size=frame_size)
    raise UnsupportedMediaError(f"unsupported video input of type {type(source).__name__}", **err)


def _frames_from_list(source, index: int | None, frame_size: FrameSize | None, load: dict) -> np.ndarray:
    """Frames given one by one -> (T, H, W, 3) uint8, each brought to its final size once loaded."""
    out, size = None, None
    for t, item in enumerate(source):
        if time.monotonic() > load["deadline"]:
            raise MediaLimitError(f"loading the frames outlasted request_deadline_s="
                                  f"{load['limits'].request_deadline_s:g}", kind="video", index=index, source=source)
        image = load_image(item, index=index, **load)
        if size is None:
            size = image.size
            target = frame_size(len(source), size[1], size[0]) if frame_size else (size[1], size[0])
            out = np.empty((len(source), *target, 3), np.uint8)
        # frames of one video must share a size; odd ones are brought to the first frame's size
        if image.size != size:
            image = image.resize(size, Image.BICUBIC)
        out[t] = fit_frame(np.asarray(image), *out.shape[1:3])
    return out


def fit_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """One (H, W, 3) uint8 frame at (height, width), with the batch resize's arithmetic (bit-identical)."""
    if frame.shape[:2] == (height, width):
        return frame
    if not frame.flags.writeable:  # torch.from_numpy wants a writable array
        frame = frame.copy()
    return resize_frames(frame[None], height, width)[0].numpy()


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


# --------------------------------------------------------------------------- video files (PyAV)
# Demuxers a file may use: common containers only. Playlists and concat lists (hls, concat, dash...)
# would make FFmpeg open other files or URLs named inside the file, so they are not on the list.
VIDEO_FORMATS = "mov,matroska,avi,gif,apng,mpegts,mpeg,flv,asf,ogg,ivf,m4v,h264,hevc"
PLAYLIST_MAGIC = (b"#EXTM3U", b"#EXT-X-", b"ffconcat")
DECODE_MEMORY = 64 << 20  # frames in flight across decoder threads, at most about this many bytes


def _refuse_playlist(target, err: dict) -> None:
    """A clear error for playlists and concat lists (the format whitelist refuses them anyway)."""
    if isinstance(target, str):
        with open(target, "rb") as f:
            head = f.read(64)
    else:
        head = bytes(target.getbuffer()[:64])
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(PLAYLIST_MAGIC):
        raise UnsupportedMediaError("playlists and concat lists (HLS, ffconcat) are refused: they name other files",
                                    **err)


def _open_container(target, err: dict, limits: MediaLimits, deadline: float):
    import av  # imported lazily: image-only use never pays for FFmpeg

    if isinstance(target, str):
        target = os.path.abspath(target)  # a leading "name:" must not read as a protocol
    else:
        target.seek(0)
    # bytes in memory have no protocol at all: a name that matches none shuts nested opens out
    protocols = "file" if isinstance(target, str) else "none"
    # FFmpeg's interrupt callback ends any single open / read still running at the deadline
    left = max(deadline - time.monotonic(), 0.01)
    try:
        container = av.open(target, timeout=(left, left), container_options={"format_whitelist": VIDEO_FORMATS,
                                                                             "protocol_whitelist": protocols})
    except Exception as exc:  # av.error.*, OSError, ValueError...
        _past(deadline, limits, err)  # interrupted at the deadline: say so
        raise MediaDecodeError(f"not a readable video (accepted containers: {VIDEO_FORMATS}): {exc}", **err) from None
    if not container.streams.video:
        container.close()
        raise MediaDecodeError("no video stream in the file", **err)
    return container


def _check_frame_size(width: int, height: int, limits: MediaLimits, err: dict) -> None:
    if width * height > limits.max_frame_pixels:
        raise MediaLimitError(f"{width}x{height} video frames ({width * height} pixels) are over max_frame_pixels="
                              f"{limits.max_frame_pixels}", **err)


def _past(deadline: float, limits: MediaLimits, err: dict) -> None:
    if time.monotonic() > deadline:
        raise MediaLimitError(f"reading the video outlasted request_deadline_s={limits.request_deadline_s:g}", **err)


def _probe(target, limits: MediaLimits, deadline: float, err: dict) -> tuple[int, float]:
    """(frame count, fps) of the first video stream, its frame size checked; counts packets when
    the header has no count."""
    container = _open_container(target, err, limits, deadline)
    try:
        stream = container.streams.video[0]
        _check_frame_size(stream.codec_context.width, stream.codec_context.height, limits, err)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 24.0
        total = int(stream.frames or 0)
        if total <= 0:
            for packet in container.demux(stream):
                total += packet.size > 0
                if total % 256 == 0:
                    _past(deadline, limits, err)
    except MediaError:
        raise
    except Exception as exc:  # av raises many error types for broken streams
        _past(deadline, limits, err)
        raise MediaDecodeError(f"cannot read video stream: {exc}", **err) from None
    finally:
        container.close()
    if total <= 0:
        raise EmptyMediaError("video has no frames", **err)
    return total, fps


def _decode_frames(target, indices: list[int], frame_size: FrameSize | None, limits: MediaLimits,
                   deadline: float, err: dict) -> tuple[np.ndarray | None, set[int], int]:
    """Decode sequentially; each wanted frame goes, at its final size, to every position that wants
    it. Returns (frames (T, h, w, 3) uint8 or None, source indices filled, frames seen)."""
    positions: dict[int, list[int]] = {}
    for t, i in enumerate(indices):
        positions.setdefault(i, []).append(t)
    out, filled, seen, last = None, set(), 0, max(indices)
    container = _open_container(target, err, limits, deadline)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frame_bytes = max(stream.codec_context.width * stream.codec_context.height * 3, 1)
        stream.codec_context.thread_count = max(1, min(os.cpu_count() or 1, DECODE_MEMORY // frame_bytes))
        stream.codec_context.options = {"max_pixels": str(limits.max_frame_pixels)}  # the decoder's own check
        for frame in container.decode(stream):
            _past(deadline, limits, err)
            _check_frame_size(frame.width, frame.height, limits, err)
            if seen in positions:
                array = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8, the one source-size frame held
                if out is None:
                    h, w = array.shape[:2]
                    out = np.empty((len(indices), *(frame_size(len(indices), h, w) if frame_size else (h, w)), 3),
                                   np.uint8)
                out[positions[seen]] = fit_frame(array, *out.shape[1:3])
                filled.add(seen)
            seen += 1
            if seen > last:
                break
    except MediaError:
        raise
    except Exception as exc:
        _past(deadline, limits, err)
        if not filled:
            raise MediaDecodeError(f"cannot decode video: {exc}", **err) from None
        # a truncated tail: keep what decoded, the caller re-samples over the frames seen
    finally:
        container.close()
    return out, filled, seen


def _sample(sampler: FrameSampler, total: int, fps: float, limits: MediaLimits, err: dict) -> list[int]:
    """The sampler's indices, at most ``max_frames`` of them (evenly thinned), within the clip."""
    indices = [min(max(int(i), 0), total - 1) for i in sampler(total, fps)]
    if not indices:
        raise EmptyMediaError("no frame was selected (check num_frames / fps)", **err)
    if len(indices) > limits.max_frames:
        keep = np.linspace(0, len(indices) - 1, limits.max_frames).round().astype(int)
        indices = [indices[k] for k in keep]
    return indices


def decode_video(target, sampler: FrameSampler, err: dict, *, limits: MediaLimits, deadline: float,
                 frame_size: FrameSize | None = None) -> VideoClip:
    """A video file (path or BytesIO) -> the sampled frames (at ``frame_size`` when given)."""
    _refuse_playlist(target, err)
    total, fps = _probe(target, limits, deadline, err)
    indices = _sample(sampler, total, fps, limits, err)
    frames, filled, seen = _decode_frames(target, indices, frame_size, limits, deadline, err)
    if seen == 0:
        raise EmptyMediaError("no decodable frames", **err)
    if len(filled) < len(set(indices)):
        # header over-counted (truncated file): sample again over the frames that really exist
        total = seen
        indices = _sample(sampler, total, fps, limits, err)
        frames, filled, seen = _decode_frames(target, indices, frame_size, limits, deadline, err)
        if len(filled) < len(set(indices)):
            raise MediaDecodeError("video is truncated and frames could not be decoded", **err)
    return VideoClip(frames, fps, total, indices, frame_size is not None)


__all__ = ["MediaError", "VideoClip", "load_image", "load_video", "decode_image", "to_rgb", "array_to_pil",
           "fetch_bytes_or_path", "decode_video",
           "IMAGE_FORMATS", "VIDEO_FORMATS"]
