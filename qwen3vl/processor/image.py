"""Image preprocessing: smart resize, bicubic resampling, normalisation and patchify.

Output rows follow the vision encoder's layout: each row is one flattened
(channel, temporal=2, 16, 16) patch, rows ordered in 2x2 merge windows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ImageSizeError, MediaOptionError
from .limits import MediaLimits

MAX_ASPECT_RATIO = 200
# Bound of a pixel option read without a caller's MediaLimits (qwen-vl-utils' process_vision_info)
OPTION_PIXELS = MediaLimits().max_option_pixels


@dataclass(frozen=True)
class VisionParams:
    """Geometry and normalisation shared by the image and video paths (from the preprocessor configs)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_config(cls, cfg: dict, min_pixels: int = 65536, max_pixels: int = 16777216) -> "VisionParams":
        size = cfg.get("size") or {}
        return cls(
            patch_size=int(cfg.get("patch_size", 16)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            merge_size=int(cfg.get("merge_size", 2)),
            # explicit min/max_pixels win over `size`, as in the reference's constructor
            min_pixels=int(cfg.get("min_pixels") or size.get("shortest_edge") or min_pixels),
            max_pixels=int(cfg.get("max_pixels") or size.get("longest_edge") or max_pixels),
            image_mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
        )


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
    """Closest (h, w), both multiples of ``factor``, with h*w in [min_pixels, max_pixels].

    Same arithmetic as the reference (Python's round-half-even included).
    """
    if min(height, width) <= 0:
        raise ImageSizeError(f"image has zero size ({width}x{height})", kind="image")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageSizeError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width):.1f} ({width}x{height})", kind="image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# qwen-vl-utils' per-item defaults, in merged tokens (times factor**2 pixels)
ITEM_MIN_TOKENS, ITEM_MAX_TOKENS = 4, 16384


def _positive(name: str, value, limit: int | None = OPTION_PIXELS) -> int:
    """A positive integer option; ``limit`` None: the caller checked it against its own MediaLimits."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: infinity
        number = None
    if number is None or isinstance(value, bool) or number <= 0 or number != value or (limit and number > limit):
        bound = f" <= {limit} (max_option_pixels)" if limit else ""
        raise MediaOptionError(f"{name} must be a positive integer{bound}, got {value!r}", kind="image")
    return number


def item_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' variant: a side never rounds below one factor; min must not exceed max."""
    if min_pixels > max_pixels:
        raise ImageSizeError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})", kind="image")
    if min(height, width) <= 0:
        raise ImageSizeError(f"image has zero size ({width}x{height})", kind="image")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageSizeError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                             f"got {max(height, width) / min(height, width):.1f} ({width}x{height})", kind="image")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise ImageSizeError(f"max_pixels ({max_pixels}) is too small for one {factor}x{factor} patch "
                             f"at this aspect ratio ({width}x{height})", kind="image")
    return h_bar, w_bar


def target_image_size(height: int, width: int, params: VisionParams, *, min_pixels=None, max_pixels=None,
                      resized_height=None, resized_width=None, item_options: bool = False) -> tuple[int, int]:
    """Target size. With ``item_options`` (a content part's own options) qwen-vl-utils' rules apply:
    ``resized_height``/``resized_width`` give the size (rounded to the factor, default budget);
    else the part's ``min_pixels``/``max_pixels`` with defaults 4 and 16384 merged tokens.
    Call-level ``min_pixels``/``max_pixels`` replace the processor's configured budget.
    """
    f = params.factor
    if (resized_height is None) != (resized_width is None):
        raise ImageSizeError("resized_height and resized_width must be given together", kind="image")
    if resized_height is not None:
        rh, rw = _positive("resized_height", resized_height, None), _positive("resized_width", resized_width, None)
        return item_smart_resize(rh, rw, f, ITEM_MIN_TOKENS * f * f, ITEM_MAX_TOKENS * f * f)
    lo = _positive("min_pixels", min_pixels, None) if min_pixels is not None else None
    hi = _positive("max_pixels", max_pixels, None) if max_pixels is not None else None
    if item_options:
        return item_smart_resize(height, width, f, ITEM_MIN_TOKENS * f * f if lo is None else lo,
                                 ITEM_MAX_TOKENS * f * f if hi is None else hi)
    lo = params.min_pixels if lo is None else lo
    hi = params.max_pixels if hi is None else hi
    return smart_resize(height, width, f, lo, hi)


def patchify_frames(frames: torch.Tensor, params: VisionParams, *, pil: bool = False,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """(T, H, W, C) uint8 frames, T a multiple of temporal_patch_size -> (N, C*tp*ps*ps) float32.

    Normalised with the reference's arithmetic, bit for bit: its torchvision backend computes
    (x - 255*mean) / (255*std) in float32; its PIL backend (``pil``) rescales in float64, rounds
    to float32, then (x - mean) / std in float32.

    Rows are ordered (t, h-window, w-window, row in window, col in window); within a row the
    values are ordered (channel, frame in pair, y, x), as the patch-embedding Conv3d expects.
    ``out``: a (N, C*tp*ps*ps) float32 tensor to write into (e.g. a slice of a batch's rows).
    """
    t, h, w, c = frames.shape
    ps, ms, tp = params.patch_size, params.merge_size, params.temporal_patch_size
    gt, gh, gw = t // tp, h // ps, w // ps
    x = frames.view(gt, tp, gh // ms, ms, ps, gw // ms, ms, ps, c)
    # (gt, gh/ms, gw/ms, ms_h, ms_w, C, tp, ps_y, ps_x)
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    shape = (1, 1, 1, 1, 1, c, 1, 1, 1)
    rows = torch.empty((gt * gh * gw, c * tp * ps * ps), dtype=torch.float32) if out is None else out
    out = rows.view(x.shape)
    if pil:
        out.copy_((x.to(torch.float64) * (1 / 255)).to(torch.float32))
        mean, std = torch.tensor(params.image_mean, dtype=torch.float32), torch.tensor(params.image_std,
                                                                                       dtype=torch.float32)
    else:
        out.copy_(x)  # one pass: gather + uint8 -> float32
        mean = torch.tensor(params.image_mean, dtype=torch.float32) * (1.0 / (1 / 255))
        std = torch.tensor(params.image_std, dtype=torch.float32) * (1.0 / (1 / 255))
    out.sub_(mean.view(shape)).div_(std.view(shape))
    return rows  # (N, C*tp*ps*ps)


def resize_frames(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, height, width, 3) uint8, bicubic with antialiasing.

    Resizes the uint8 tensor itself (as torchvision does): PyTorch's uint8 kernel rounds and
    clamps between its horizontal and vertical passes, so this is bit-exact with the reference.
    """
    x = torch.from_numpy(frames)
    if x.shape[1:3] == (height, width):
        return x
    x = x.permute(0, 3, 1, 2)  # (T, 3, H, W) uint8, channels-last in memory
    y = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return y.permute(0, 2, 3, 1)  # (T, h, w, 3) uint8


def resize_image(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Bicubic resize through PIL on uint8 (the reference's PIL backend does the same)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.BICUBIC)
    return np.asarray(image)  # (H, W, 3) uint8


def image_rows(pixels: torch.Tensor, params: VisionParams, *, pil: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 at the model's size -> its pixel rows (N, 3*2*16*16) float32 (into ``out``)."""
    # duplicate the still image into a temporal pair (a view: no copy before patchify)
    frames = pixels.unsqueeze(0).expand(params.temporal_patch_size, *pixels.shape)
    return patchify_frames(frames, params, pil=pil, out=out)  # (gh*gw, 3*2*16*16)


def resize_for_model(image: Image.Image, params: VisionParams, *, index: int | None = None, do_resize: bool = True,
                     pil: bool = False, **size_overrides) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One RGB PIL image -> ((H, W, 3) uint8 at the model's size, grid (1, h/16, w/16)).

    ``do_resize=False`` takes the image as it is (its sides must be multiples of the factor).
    Resize and normalisation follow transformers' default (torchvision) image backend, bit for
    bit; ``pil=True`` follows its PIL backend (``AutoProcessor.from_pretrained(..., use_fast=False)``).
    """
    width, height = image.size
    try:
        if do_resize:
            th, tw = target_image_size(height, width, params, **size_overrides)
        elif height % params.factor or width % params.factor:
            raise ImageSizeError(f"do_resize=False needs sides that are multiples of {params.factor}, "
                                 f"got {width}x{height}", kind="image")
        else:
            th, tw = height, width
    except ImageSizeError as exc:
        raise ImageSizeError(exc.reason, kind="image", index=index, source=image) from None
    if pil:
        pixels = torch.from_numpy(resize_image(image, th, tw).copy())  # (H, W, 3) uint8
    else:
        pixels = resize_frames(np.array(image)[None], th, tw)[0]  # (H, W, 3) uint8 (a writable copy)
    return pixels, (1, th // params.patch_size, tw // params.patch_size)
