"""``MediaLimits``: how much one call may make the processor fetch, decode and keep.

Every limit is checked **before** the expensive step it guards (image size from the header before
decoding, frame size and count before decoding frames, download size from Content-Length and while
streaming, option values before any resize). A library user's defaults are generous (their own
files, their own machine); the server builds stricter ones from its flags (``qwen3vl serve``).

Limits bound what the processor fetches and decodes. Already-decoded inputs (PIL images, arrays,
tensors) are taken as they are: their cost was paid by the caller. Pixel options are bounded per
image / per frame by ``max_option_pixels``; a video's ``total_pixels`` and its size once resized
(t x h x w, checked before its frames are decoded) by ``max_video_pixels``, by default ``max_frames
x max_option_pixels`` (what the per-frame bounds allow anyway). Pillow's own decompression-bomb
limit (its global setting, left as it is) still applies on top of ``max_image_pixels``.
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
    max_option_pixels: int = 16384 * 32 * 32  # bound on min_pixels / max_pixels / resized_h x w
    max_video_pixels: int | None = None     # t x h x w of one resized video; None: max_frames x max_option_pixels
    # ---- remote media (http / https)
    max_download_bytes: int = 512 * MIB     # per item: Content-Length checked first, then the stream (data: URLs too)
    read_timeout_s: float = 10.0            # per socket read
    item_deadline_s: float = 60.0           # whole fetch of one item
    request_deadline_s: float = 300.0       # all media of one call (fetching and decoding)
    allow_private: bool = True              # loopback / private / link-local addresses (the server: False)
    allowed_domains: tuple[str, ...] | None = None  # when set, only these hosts (and their subdomains)
    max_redirects: int = 5                  # redirects followed per item, each hop checked again
    # ---- local files
    max_file_bytes: int | None = None       # size of a local file (None: unlimited; it is read lazily)

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_frame_pixels", "max_frames", "max_option_pixels",
                     "max_download_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_images", "max_videos", "max_file_bytes", "max_video_pixels"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")
        for name in ("read_timeout_s", "item_deadline_s", "request_deadline_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.allowed_domains is not None:
            if isinstance(self.allowed_domains, str):
                raise ValueError("allowed_domains must be a sequence of host names, not one string")
            # stored lower-case, without a trailing dot: host names compare that way
            domains = tuple(d.strip().lower().rstrip(".") for d in self.allowed_domains)
            object.__setattr__(self, "allowed_domains", tuple(d for d in domains if d))

    @property
    def max_total_pixels(self) -> int:
        """Bound on a video's ``total_pixels`` option and on its t x h x w once resized."""
        return self.max_video_pixels or self.max_frames * self.max_option_pixels

    @property
    def total_pixels_name(self) -> str:
        """What sets ``max_total_pixels`` (named in errors)."""
        return "max_video_pixels" if self.max_video_pixels else "max_frames x max_option_pixels"


__all__ = ["MediaLimits"]
