"""``processor.image_processor`` / ``processor.video_processor``: the settable knobs of the reference.

Users set ``size`` (``{"shortest_edge": min_pixels, "longest_edge": max_pixels}``), ``min_pixels``,
``max_pixels`` (aliases of the two edges), ``patch_size``, ``merge_size``, ``temporal_patch_size``,
and for videos ``fps``, ``min_frames``, ``max_frames``, ``do_sample_frames``; every call reads them
afresh, so changes take effect on the next call.
"""
from __future__ import annotations

from .image import VisionParams
from .video import VideoParams


class ImageProcessor:
    """Mutable image-processing settings (the reference's ``Qwen2VLImageProcessor`` attributes)."""

    def __init__(self, params: VisionParams, use_fast: bool = True):
        # transformers' backends: True (default) the torchvision one, False the PIL one; both bit-exact
        self.use_fast = use_fast
        self.patch_size = params.patch_size
        self.temporal_patch_size = params.temporal_patch_size
        self.merge_size = params.merge_size
        self.image_mean = list(params.image_mean)
        self.image_std = list(params.image_std)
        self.size = {"shortest_edge": params.min_pixels, "longest_edge": params.max_pixels}
        self.do_resize = True

    @property
    def min_pixels(self) -> int:
        return self.size["shortest_edge"]

    @min_pixels.setter
    def min_pixels(self, value: int) -> None:
        self.size = {**self.size, "shortest_edge": int(value)}

    @property
    def max_pixels(self) -> int:
        return self.size["longest_edge"]

    @max_pixels.setter
    def max_pixels(self, value: int) -> None:
        self.size = {**self.size, "longest_edge": int(value)}

    def params(self) -> VisionParams:
        """The current settings as an immutable ``VisionParams`` (checked)."""
        size = self.size
        if not isinstance(size, dict) or "shortest_edge" not in size or "longest_edge" not in size:
            raise ValueError(f"size must be a dict with 'shortest_edge' and 'longest_edge', got {size!r}")
        lo, hi = int(size["shortest_edge"]), int(size["longest_edge"])
        if lo <= 0 or hi < lo:
            raise ValueError(f"size needs 0 < shortest_edge <= longest_edge, got {size!r}")
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        return VisionParams(int(self.patch_size), int(self.temporal_patch_size), int(self.merge_size), lo, hi,
                            tuple(self.image_mean), tuple(self.image_std))


class VideoProcessor(ImageProcessor):
    """Mutable video-processing settings (the reference's ``Qwen3VLVideoProcessor`` attributes)."""

    def __init__(self, params: VideoParams):
        super().__init__(params.vision)
        self.fps = params.fps
        self.min_frames = params.min_frames
        self.max_frames = params.max_frames
        self.num_frames = None
        self.do_sample_frames = True

    def video_params(self) -> VideoParams:
        if self.fps is not None and float(self.fps) <= 0:
            raise ValueError(f"fps must be positive, got {self.fps!r}")
        return VideoParams(self.params(), float(self.fps or 2.0), int(self.min_frames), int(self.max_frames))


__all__ = ["ImageProcessor", "VideoProcessor"]
