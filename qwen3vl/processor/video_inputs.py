"""Already-decoded videos with their metadata (the qwen-vl-utils / transformers ``video_metadata`` flow).

``video_metadata`` entries are dicts (qwen-vl-utils) or objects (transformers' ``VideoMetadata``)
with ``fps`` (of the source), ``frames_indices`` (source index of each given frame) and
``total_num_frames``. With ``do_sample_frames=False`` every given frame is kept and timestamps come
from ``frames_indices / fps``; with ``do_sample_frames=True`` frames are sampled from the given ones
as the reference does (over ``total_num_frames``, ``fps`` or ``num_frames``).
"""
from __future__ import annotations

import numpy as np

from .errors import MediaDecodeError, UnsupportedMediaError
from .video import VideoClip, VideoParams, sample_indices


def metadata_field(metadata, name: str):
    """One field of a metadata dict or object (None when absent)."""
    if isinstance(metadata, dict):
        return metadata.get(name)
    return getattr(metadata, name, None)


def apply_metadata(clip: VideoClip, metadata, params: VideoParams, *, index: int, sample: bool,
                   fps: float | None = None, num_frames: int | None = None) -> VideoClip:
    """Re-time (and, when ``sample``, sub-sample) a clip of given frames by its metadata."""
    err = dict(kind="video", index=index)
    if metadata is None:
        return clip
    if not isinstance(metadata, dict) and not hasattr(metadata, "fps"):
        raise UnsupportedMediaError(f"video_metadata must be a dict or VideoMetadata, got {type(metadata).__name__}",
                                    **err)
    video_fps = metadata_field(metadata, "fps")
    video_fps = float(video_fps) if video_fps else 24.0  # the reference's default too
    count = len(clip.frames)
    if sample:
        total = int(metadata_field(metadata, "total_num_frames") or count)
        indices = sample_indices(total, video_fps, params, fps=fps, num_frames=num_frames)
        if indices.max() >= count:
            raise MediaDecodeError(f"video_metadata says {total} frames but the video has {count}", **err)
        return VideoClip(clip.frames[indices], video_fps, total, [int(i) for i in indices])
    given = metadata_field(metadata, "frames_indices")
    indices = list(range(count)) if given is None else [int(i) for i in np.asarray(given).reshape(-1)]
    if len(indices) != count:
        raise MediaDecodeError(f"video_metadata has {len(indices)} frames_indices but the video has {count} frames",
                               **err)
    total = metadata_field(metadata, "total_num_frames")
    return VideoClip(clip.frames, video_fps, int(total) if total else count, indices)


__all__ = ["apply_metadata", "metadata_field"]
