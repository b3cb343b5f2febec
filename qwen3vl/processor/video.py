"""Video preprocessing: frame sampling, one size for all frames, patchify, timestamps.

Follows the reference video processor: sample ``fps`` frames per second (default 2) or exactly
``num_frames``, clamped to [min_frames, max_frames] and the clip length; indices are
``linspace(0, total-1, n)`` rounded; all frames are resized to one size chosen from the total
pixel budget over ``t*h*w``; an odd frame count is padded by repeating the last frame; each
temporal pair becomes one slice, announced by the mean time of its two frames (``<1.2 seconds>``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ImageSizeError
from .image import MAX_ASPECT_RATIO, VisionParams, patchify_frames, resize_frames


@dataclass
class VideoClip:
    """Decoded, already-sampled frames of one video plus what we know of its timing."""

    frames: np.ndarray                  # (T, H, W, 3) uint8
    fps: float                          # frames per second of ``indices``' time base
    total_frames: int                   # frames in the source
    indices: list[int] = field(default_factory=list)  # source frame index of each kept frame
    resized: bool = False               # frames already at their final size (resized one by one as decoded)


@dataclass(frozen=True)
class VideoParams:
    """Sampling settings of the video processor (video_preprocessor_config.json)."""

    vision: VisionParams
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768

    @classmethod
    def from_config(cls, cfg: dict) -> "VideoParams":
        return cls(
            vision=VisionParams.from_config(cfg, min_pixels=4096, max_pixels=25165824),
            fps=float(cfg.get("fps") or 2.0),
            min_frames=int(cfg.get("min_frames", 4)),
            max_frames=int(cfg.get("max_frames", 768)),
        )


def sample_indices(total_frames: int, video_fps: float | None, params: VideoParams, *,
                   fps: float | None = None, num_frames: int | None = None) -> np.ndarray:
    """Indices of the frames to keep, exactly as the reference's ``sample_frames``."""
    if fps is not None and num_frames is not None:
        raise ValueError("`num_frames` and `fps` are mutually exclusive, pass only one")
    if num_frames is None:
        fps = params.fps if fps is None else fps
        video_fps = video_fps or 24.0
        num_frames = int(total_frames / video_fps * fps)
        num_frames = min(max(num_frames, params.min_frames), params.max_frames, total_frames)
    return np.linspace(0, total_frames - 1, int(num_frames)).round().astype(int)


def video_smart_resize(num_frames: int, height: int, width: int, factor: int = 32, temporal_factor: int = 2,
                       min_pixels: int = 4096, max_pixels: int = 25165824) -> tuple[int, int]:
    """One (h, w) for all frames so that t*h*w fits the budget (the reference's video variant)."""
    if height < factor or width < factor:  # tiny frames are first scaled up to one factor
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageSizeError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                             f"got {max(height, width) / min(height, width):.1f}", kind="video")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    # the budget test uses the rounded t, the rescale uses the real frame count (as the reference)
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_video_size(num_frames: int, height: int, width: int, params: VideoParams, *, total_pixels=None,
                      min_pixels=None, max_pixels=None, resized_height=None, resized_width=None):
    """Frame size for a clip. ``total_pixels`` replaces the t*h*w budget; per-frame
    ``min_pixels``/``max_pixels`` (qwen-vl-utils) bound it by ``num_frames`` times that."""
    v = params.vision
    lo = v.min_pixels
    hi = int(total_pixels) if total_pixels is not None else v.max_pixels
    if max_pixels is not None:
        hi = min(hi, int(max_pixels) * num_frames)
    if min_pixels is not None:
        lo = max(lo, int(min_pixels) * num_frames)
    if resized_height and resized_width:
        height, width = int(resized_height), int(resized_width)
        hi = max(hi, num_frames * height * width)
    return video_smart_resize(num_frames, height, width, v.factor, v.temporal_patch_size, lo, max(lo, hi))


def slice_timestamps(indices, fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Mean time (seconds) of the first and last frame of every temporal slice."""
    idx = [int(i) for i in indices]
    if len(idx) % temporal_patch_size:
        idx += [idx[-1]] * (temporal_patch_size - len(idx) % temporal_patch_size)
    times = [i / fps for i in idx]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


@dataclass
class ProcessedVideo:
    pixel_values: torch.Tensor   # (gt*gh*gw, 3*2*16*16) float32
    grid_thw: tuple[int, int, int]
    indices: list[int]           # source frame index of each sampled frame (before padding)
    timestamps: list[float]      # one per temporal slice, seconds
    fps: float
    total_frames: int


def preprocess_video(clip: VideoClip, params: VideoParams, *, index: int | None = None, do_resize: bool = True,
                     **size_overrides) -> ProcessedVideo:
    """Sampled frames -> patch rows, grid and per-slice timestamps (``do_resize=False``: frames as given)."""
    v = params.vision
    t, h, w, _ = clip.frames.shape
    try:
        if clip.resized:  # the decoder brought each frame to target_video_size already
            do_resize = False
        if not do_resize and (h % v.factor or w % v.factor):
            raise ImageSizeError(f"do_resize=False needs frame sides that are multiples of {v.factor}, got {w}x{h}",
                                 kind="video")
        th, tw = (h, w) if not do_resize else target_video_size(t, h, w, params, **size_overrides)
    except ImageSizeError as exc:
        raise ImageSizeError(exc.reason, kind="video", index=index) from None
    frames = resize_frames(clip.frames, th, tw)  # (T, th, tw, 3) uint8
    if pad := -t % v.temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], 0)
    rows = patchify_frames(frames, v)  # (gt*gh*gw, 1536), the reference's arithmetic
    grid = (frames.shape[0] // v.temporal_patch_size, th // v.patch_size, tw // v.patch_size)
    return ProcessedVideo(rows, grid, list(clip.indices), slice_timestamps(clip.indices, clip.fps,
                          v.temporal_patch_size), clip.fps, clip.total_frames)


def video_placeholder(video: ProcessedVideo, params: VideoParams, video_token: str = "<|video_pad|>",
                      start: str = "<|vision_start|>", end: str = "<|vision_end|>") -> str:
    """Text that replaces one ``<|video_pad|>``: per slice ``<t seconds>`` + start + pads + end."""
    per_slice = video.grid_thw[1] * video.grid_thw[2] // params.vision.merge_size ** 2
    body = start + video_token * per_slice + end
    return "".join(f"<{ts:.1f} seconds>" + body for ts in video.timestamps[: video.grid_thw[0]])
