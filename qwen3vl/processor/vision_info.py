"""``process_vision_info``: qwen-vl-utils' loader, without qwen-vl-utils or torchvision.

Same signature and results as qwen-vl-utils 0.0.14: images come back as RGB PIL images resized
to the model's factor (``image_patch_size * 2``: 28 for Qwen2.5-VL, 32 for Qwen3-VL); videos as
float32 tensors (T, C, H, W) holding uint8 values (antialiased bicubic resize in float32, then
clamped and rounded, as torchvision's tensor resize that qwen-vl-utils calls), with an even frame count; optionally each with its metadata dict
(``fps``, ``frames_indices``, ``total_num_frames``) and ``video_kwargs`` for the processor.
Per-item options: ``resized_height``/``resized_width``, ``min_pixels``, ``max_pixels``,
``total_pixels``, ``fps``, ``nframes`` (alias ``num_frames``), ``min_frames``, ``max_frames``, and
``video_start`` / ``video_end`` (seconds: sample only that window of a video file or URL; frames
``ceil(start * fps)`` to ``floor(end * fps)``, as qwen-vl-utils' decord and torchcodec readers;
``frames_indices`` stay indices into the whole video, ``total_num_frames`` counts the window).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ImageSizeError, MediaError, UnsupportedMediaError
from .image import ITEM_MAX_TOKENS, ITEM_MIN_TOKENS, _positive, item_smart_resize
from .media import load_image, load_video

MERGE_SIZE = 2
FRAME_FACTOR = 2
FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2.0, 4, 768
VIDEO_MIN_TOKENS, VIDEO_MAX_TOKENS = 128, 768


def _seq_len() -> int:
    return int(float(os.environ.get("MODEL_SEQ_LEN", 128000)))


def extract_vision_info(conversations) -> list[dict]:
    """The image / video content parts of one conversation or a list of them, in order."""
    if conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    infos = []
    for conversation in conversations:
        for message in conversation:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for ele in content:
                if isinstance(ele, dict) and ("image" in ele or "image_url" in ele or "video" in ele
                                              or ele.get("type", "text") in ("image", "image_url", "video")):
                    infos.append(ele)
    return infos


def _image_source(ele: dict, index: int):
    source = ele.get("image", ele.get("image_url"))
    if isinstance(source, dict):
        source = source.get("url")
    if source is None and isinstance(ele.get("base64"), str):
        source = ele["base64"] if ele["base64"].startswith("data:") else f"data:image/unknown;base64,{ele['base64']}"
    if source is None:
        raise UnsupportedMediaError("the content part names no source (image, image_url or base64)",
                                    kind="image", index=index)
    return source


def _sized(fn, kind: str, index: int, source=None):
    try:
        return fn()
    except ImageSizeError as exc:
        raise ImageSizeError(exc.reason, kind=kind, index=index, source=source) from None


def fetch_image(ele: dict, image_patch_size: int = 14, *, index: int = 0) -> Image.Image:
    """One image part -> RGB PIL image resized as qwen-vl-utils does."""
    factor = int(image_patch_size) * MERGE_SIZE
    image = load_image(_image_source(ele, index), index=index)
    return resize_image_item(image, ele, factor, index=index)


def resize_image_item(image: Image.Image, ele: dict, factor: int, *, index: int = 0) -> Image.Image:
    if "resized_height" in ele and "resized_width" in ele:
        def size():
            return item_smart_resize(_positive("resized_height", ele["resized_height"]),
                                     _positive("resized_width", ele["resized_width"]), factor,
                                     ITEM_MIN_TOKENS * factor ** 2, ITEM_MAX_TOKENS * factor ** 2)
    else:
        def size():
            lo = _positive("min_pixels", ele["min_pixels"]) if "min_pixels" in ele else ITEM_MIN_TOKENS * factor ** 2
            hi = _positive("max_pixels", ele["max_pixels"]) if "max_pixels" in ele else ITEM_MAX_TOKENS * factor ** 2
            return item_smart_resize(image.height, image.width, factor, lo, hi)
    height, width = _sized(size, "image", index, image)
    return image.resize((width, height))


def smart_nframes(ele: dict, total_frames: int, video_fps: float, *, index: int = 0) -> int:
    """How many frames to sample (qwen-vl-utils' rules; ``num_frames`` is taken as ``nframes``)."""
    err = dict(kind="video", index=index)
    count = ele.get("nframes", ele.get("num_frames"))
    if count is not None and ele.get("fps") is not None:
        raise UnsupportedMediaError("give either fps or nframes/num_frames, not both", **err)
    if count is not None:
        nframes = round(_positive("nframes", count) / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = ele.get("fps") if ele.get("fps") is not None else FPS
        if fps <= 0:
            raise UnsupportedMediaError(f"fps must be positive, got {fps!r}", **err)
        min_frames = math.ceil(ele.get("min_frames", FPS_MIN_FRAMES) / FRAME_FACTOR) * FRAME_FACTOR
        max_frames = math.floor(ele.get("max_frames", min(FPS_MAX_FRAMES, total_frames)) / FRAME_FACTOR) * FRAME_FACTOR
        nframes = total_frames / video_fps * fps
        nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
        nframes = math.floor(nframes / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise UnsupportedMediaError(f"nframes must be in [{FRAME_FACTOR}, {total_frames}] for this "
                                    f"{total_frames}-frame video, got {nframes}", **err)
    return int(nframes)


def _video_frames(ele: dict, factor: int, index: int):
    """(frames (T, C, H, W) uint8, metadata dict, sample fps) before resizing."""
    source = ele.get("video")
    if source is None:
        raise UnsupportedMediaError("the content part names no source (video)", kind="video", index=index)
    if isinstance(source, (list, tuple)):
        process = {k: v for k, v in ele.items() if k not in ("type", "video")}
        images = [fetch_image({"image": f, **process}, factor, index=index) for f in source]
        nframes = math.ceil(len(images) / FRAME_FACTOR) * FRAME_FACTOR
        images += [images[-1]] * (nframes - len(images))
        sample_fps = ele.get("sample_fps", 2.0)
        raw_fps = ele.get("raw_fps", sample_fps)
        frames = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
                              for im in images])
        meta = dict(fps=raw_fps, frames_indices=list(range(len(frames))),
                    total_num_frames=(nframes / sample_fps) * raw_fps)
        return frames, meta, sample_fps
    state = {}

    def sampler(total, video_fps):
        start, end, count = video_frame_range(ele, total, video_fps, index=index)
        n = smart_nframes(ele, count, video_fps, index=index)
        state["count"] = count
        return torch.linspace(start, end, n).round().long().tolist()

    clip = load_video(source, sampler, index=index)
    frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2)  # (T, C, H, W) uint8
    count = state.get("count", clip.total_frames)
    meta = dict(fps=clip.fps, frames_indices=torch.tensor(clip.indices, dtype=torch.int64),
                total_num_frames=count, video_backend="pyav")
    return frames, meta, len(clip.indices) / max(count, 1e-6) * clip.fps


def video_frame_range(ele: dict, total_frames: int, video_fps: float, *, index: int = 0) -> tuple[int, int, int]:
    """(first frame, last frame, frame count) of the ``video_start`` / ``video_end`` window, in
    seconds, clamped to the video (qwen-vl-utils' ``calculate_video_frame_range``); the whole video
    when neither is given."""
    start_s, end_s = ele.get("video_start"), ele.get("video_end")
    if start_s is None and end_s is None:
        return 0, total_frames - 1, total_frames
    err = dict(kind="video", index=index)
    duration = total_frames / video_fps
    for name, value in (("video_start", start_s), ("video_end", end_s)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise UnsupportedMediaError(f"{name} must be a number of seconds, got {value!r}", **err)
    start = math.ceil(max(0.0, min(start_s, duration)) * video_fps) if start_s is not None else 0
    end = total_frames - 1
    if end_s is not None:
        end = min(math.floor(max(0.0, min(end_s, duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise UnsupportedMediaError(
            f"empty time range: video_start={start_s!r} s, video_end={end_s!r} s select frames {start}..{end} of "
            f"this {duration:.2f} s video ({total_frames} frames at {video_fps:g} fps)", **err)
    return start, end, end - start + 1


def video_target_size(ele: dict, nframes: int, height: int, width: int, factor: int, index: int = 0):
    def size():
        if "resized_height" in ele and "resized_width" in ele:
            return item_smart_resize(_positive("resized_height", ele["resized_height"]),
                                     _positive("resized_width", ele["resized_width"]), factor,
                                     ITEM_MIN_TOKENS * factor ** 2, ITEM_MAX_TOKENS * factor ** 2)
        lo = _positive("min_pixels", ele["min_pixels"]) if "min_pixels" in ele else VIDEO_MIN_TOKENS * factor ** 2
        total = ele["total_pixels"] if "total_pixels" in ele else _seq_len() * factor * factor * 0.9
        if total <= 0:
            raise ImageSizeError(f"total_pixels must be positive, got {total!r}", kind="video")
        hi = max(min(VIDEO_MAX_TOKENS * factor ** 2, total / nframes * FRAME_FACTOR), int(lo * 1.05))
        if "max_pixels" in ele:
            hi = min(_positive("max_pixels", ele["max_pixels"]), hi)
        return item_smart_resize(height, width, factor, lo, hi)
    return _sized(size, "video", index)


def fetch_video(ele: dict, image_patch_size: int = 14, return_video_sample_fps: bool = False,
                return_video_metadata: bool = False, *, index: int = 0):
    """One video part -> float32 (T, C, H, W) tensor of uint8 values [, metadata] [, sample fps]."""
    factor = int(image_patch_size) * MERGE_SIZE
    frames, meta, sample_fps = _video_frames(ele, factor, index)
    nframes, _, height, width = frames.shape
    th, tw = video_target_size(ele, nframes, height, width, factor, index)
    if (th, tw) != (height, width):
        # torchvision's v1 tensor resize, which qwen-vl-utils calls: float32 math, clamp, round to uint8
        resized = F.interpolate(frames.float(), size=(th, tw), mode="bicubic", align_corners=False, antialias=True)
        frames = resized.clamp_(0, 255).round_().to(torch.uint8)
    video = frames.float()
    out = (video, meta) if return_video_metadata else video
    return (out, sample_fps) if return_video_sample_fps else out


def process_vision_info(conversations, return_video_kwargs: bool = False, return_video_metadata: bool = False,
                        image_patch_size: int = 14):
    """Load and resize every image / video of the conversation(s), as qwen-vl-utils does.

    Returns ``(images | None, videos | None)`` or, with ``return_video_kwargs``, also
    ``{"do_sample_frames": False}`` (plus ``"fps"``: the sample fps per video, without metadata).
    """
    images, videos, sample_fps = [], [], []
    for ele in extract_vision_info(conversations):
        if "image" in ele or "image_url" in ele or ele.get("type") in ("image", "image_url"):
            images.append(fetch_image(ele, image_patch_size, index=len(images)))
        elif "video" in ele or ele.get("type") == "video":
            video, fps = fetch_video(ele, image_patch_size, return_video_sample_fps=True,
                                     return_video_metadata=return_video_metadata, index=len(videos))
            videos.append(video)
            sample_fps.append(fps)
    video_kwargs = {"do_sample_frames": False}
    if not return_video_metadata:
        video_kwargs["fps"] = sample_fps
    result = (images or None, videos or None)
    return (*result, video_kwargs) if return_video_kwargs else result


__all__ = ["process_vision_info", "extract_vision_info", "fetch_image", "fetch_video", "smart_nframes",
           "video_frame_range", "MediaError"]
