"""``MediaLimits``: how much one call may make the processor fetch, decode and keep.

Every limit is checked **before** the expensive step it guards (image size from the header before
decoding, frame counts before decoding frames, download size from Content-Length and while
streaming, option values before any resize). A library user's defaults are generous (their own
files, their own machine); the server builds stricter ones from its flags (``qwen3vl serve``).
"""
from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class MediaLimits:
    # ---- counts per call / request (None: unlimited)
    max_images: int | None = None
    max_videos: int | None = None
    # ---- decoded sizes
    max_image_pixels: int = 50_000_000      # source pixels of one image, read from its header (Pillow's bomb limit: 89M)
    max_frame_pixels: int = 36_000_000      # source pixels of one video frame (8K is 35.4M)
    max_frames: int = 768                   # frames kept from one video, an explicit num_frames included
    max_option_pixels: int = 16384 * 32 * 32  # bound on min_pixels / max_pixels / total_pixels / resized_h x w
    # ---- remote media (http / https)
    max_download_bytes: int = 512 * MIB     # per item: Content-Length checked first, then the stream
    read_timeout_s: float = 10.0            # per socket read
    item_deadline_s: float = 60.0           # whole fetch of one item
    request_deadline_s: float = 300.0       # all media of one call
    allow_private: bool = True              # loopback / private / link-local addresses (the server: False)
    allowed_domains: tuple[str, ...] | None = None  # when set, only these hosts (and their subdomains)

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_frame_pixels", "max_frames", "max_option_pixels",
                     "max_download_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_images", "max_videos"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("read_timeout_s", "item_deadline_s", "request_deadline_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


__all__ = ["MediaLimits"]
