"""``ServeSettings``: everything ``qwen3vl serve`` needs, typed and checked once (the CLI builds
it from its arguments; a launcher or a test can build one directly).

The limit defaults keep one request near 300 MB of server memory on the demo checkpoint (measured:
tests/test_server_hardening.py for bodies and prompts, README for media): a 32 MiB body is held
about three times while parsed (bytes, text, objects); an image becomes float32 patches, about
55 bytes a pixel at the peak, so two images of 2 Mpixels (1080p) cost ~250 MB. A video's cost is
set by the checkpoint's video pixel budget (``total_pixels``), ~430 MB for a 1080p clip.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..config import ROPE_TYPES
from ..processor import MediaLimits

DEMO_MODEL_NAME = "qwen3vl-demo"
MIB = 1 << 20
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# A request's media fetches together may take this many times one item's deadline.
REQUEST_DEADLINE_ITEMS = 4


def parse_limit_mm_per_prompt(text: str) -> dict[str, int]:
    """``--limit-mm-per-prompt '{"image": 8, "video": 2}'`` -> ``{"max_images": 8, "max_videos": 2}``
    (a modality left out keeps its default)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--limit-mm-per-prompt must be a JSON object such as '{{\"image\": 4, \"video\": 1}}': "
                         f"{e}") from None
    if not isinstance(value, dict):
        raise ValueError("--limit-mm-per-prompt must be a JSON object such as '{\"image\": 4, \"video\": 1}'")
    out = {}
    for key, count in value.items():
        if key not in ("image", "video"):
            raise ValueError(f"--limit-mm-per-prompt: unknown modality {key!r} (this model takes image, video)")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"--limit-mm-per-prompt: {key} must be an integer >= 0, got {count!r}")
        out[f"max_{key}s"] = count
    return out


def check_rope_scaling(value: str | None) -> None:
    """``--rope-scaling``: a JSON object whose rope_type we support (the rest is checked against the
    checkpoint's config when the model loads)."""
    if value is None:
        return
    try:
        d = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"--rope-scaling: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"--rope-scaling must be a JSON object, got {value!r}")
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"--rope-scaling: unsupported rope_type {rope_type!r}; supported: {list(ROPE_TYPES)}")


@dataclass(frozen=True)
class ServeSettings:
    model: str | None = None                 # checkpoint folder or hub id; None: the tiny demo checkpoint
    host: str = "127.0.0.1"
    port: int = 8000                         # 0: any free port
    api_key: str | None = None               # required as "Authorization: Bearer KEY" on /v1 when set
    served_model_name: str | None = None     # the name clients use (default: from the model path)
    max_num_seqs: int = 8                    # requests decoded together (KV slots)
    max_model_len: int | None = None         # prompt + completion tokens per request (default: the model's, <= 8192)
    allowed_local_media_path: str | None = None  # local media allowed under this folder only; None: no local files
    dtype: str = "auto"
    device: str = "cpu"
    quantization: str | None = None          # "int8" | "int4" | "fp8" (CUDA): weight-only, done while loading
    group_size: int = 64                     # int4 group size
    rope_scaling: str | None = None          # JSON over config.json's text rope scaling (YaRN), see check_rope_scaling
    prefix_cache_gb: float = 2.0             # KV blocks kept for reuse across requests (later chat turns)
    enable_prefix_caching: bool = True       # False: every request prefills its whole prompt
    max_num_batched_tokens: int = 512        # tokens per step while others decode (longer prompts: in chunks)
    tensor_parallel_size: int = 1            # ranks sharing the text decoder (qwen3vl.parallel; CPU, gloo)
    enable_expert_parallel: bool = False     # MoE: whole experts per rank instead of every expert split
    # ---- media (the processor enforces these, see MediaLimits)
    max_images: int = 1                      # image parts per request (--limit-mm-per-prompt)
    max_videos: int = 1                      # video parts per request
    max_media_pixels: int = 2_097_152        # source pixels of one image or video frame (1080p fits)
    max_media_frames: int = 32               # frames kept from one video
    max_media_mb: float = 32.0               # download size of one remote item
    media_fetch_timeout: float = 30.0        # seconds for the whole fetch of one remote item
    allowed_media_domains: tuple[str, ...] | None = None  # remote media only from these hosts (and subdomains)
    allow_private_media: bool = False        # remote media from loopback / private / link-local addresses
    media_workers: int = 4                   # threads preparing requests with media (their own pool)
    # ---- HTTP
    max_body_mb: float = 32.0                # request body cap (data: URIs travel inside it)
    allowed_hosts: tuple[str, ...] | None = None    # Host header allow-list; None: see host_allow_list()
    allowed_origins: tuple[str, ...] | None = None  # CORS origins; None: no CORS headers at all

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        check_rope_scaling(self.rope_scaling)
        if not self.prefix_cache_gb >= 0:
            raise ValueError(f"prefix_cache_gb must be >= 0, got {self.prefix_cache_gb}")
        if self.max_num_batched_tokens < 16:
            raise ValueError(f"max_num_batched_tokens must be >= 16, got {self.max_num_batched_tokens}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.allowed_local_media_path is not None and not os.path.isdir(self.allowed_local_media_path):
            raise ValueError(f"allowed_local_media_path is not a folder: {self.allowed_local_media_path}")
        self._check_limits()
        for name in ("allowed_hosts", "allowed_media_domains"):
            for item in getattr(self, name) or ():
                if not item or any(c.isspace() or c in "/@" for c in item):
                    raise ValueError(f"{name}: {item!r} is not a host name")
        for origin in self.allowed_origins or ():
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"allowed_origins: {origin!r} must be '*' or start with http:// or https://")

    def _check_limits(self) -> None:
        for name in ("max_images", "max_videos"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_media_pixels", "max_media_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.media_workers <= 256:
            raise ValueError(f"media_workers must be in [1, 256], got {self.media_workers}")
        for name, flag in (("max_media_mb", "--max-media-bytes"), ("media_fetch_timeout", "--media-fetch-timeout"),
                           ("max_body_mb", "--max-body-mb")):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} ({flag}) must be > 0, got {getattr(self, name)}")

    @property
    def model_name(self) -> str:
        """The name the server answers to and reports."""
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return DEMO_MODEL_NAME
        return os.path.basename(os.path.normpath(self.model)) if os.path.isdir(self.model) else self.model

    @property
    def aliases(self) -> set[str]:
        """Other names a request may use for the served model (the --model argument as given)."""
        return {self.model} if self.model else set()

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MIB)

    def host_allow_list(self) -> frozenset[str] | None:
        """Host header values (without port, lower case) the server answers; None: any.

        A browser page from another site can make requests to a local server through DNS
        rebinding (its own name resolving to 127.0.0.1); such requests carry that page's host name,
        which this list does not hold. Bound to all interfaces the server is meant to be reached under
        names it cannot know, so it accepts any unless ``--allowed-hosts`` says otherwise."""
        if self.allowed_hosts is not None:
            return None if "*" in self.allowed_hosts else frozenset(h.lower() for h in self.allowed_hosts)
        if self.host in ("0.0.0.0", "::", ""):
            return None
        return frozenset({self.host.lower(), *LOOPBACK_NAMES})

    def media_limits(self) -> MediaLimits:
        """What one request may make the processor fetch, decode and keep."""
        deadline = float(self.media_fetch_timeout)
        return MediaLimits(
            max_images=self.max_images, max_videos=self.max_videos, max_image_pixels=self.max_media_pixels,
            max_frame_pixels=self.max_media_pixels, max_frames=self.max_media_frames,
            # no resize option may ask for more pixels than a source image or frame may have
            max_option_pixels=self.max_media_pixels,
            max_download_bytes=int(self.max_media_mb * MIB), read_timeout_s=min(10.0, deadline),
            item_deadline_s=deadline, request_deadline_s=deadline * REQUEST_DEADLINE_ITEMS,
            allow_private=self.allow_private_media, allowed_domains=self.allowed_media_domains)
