"""Hand-built model inputs (no processor): token layouts exactly as the processor writes them."""
from __future__ import annotations

import torch

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, PAD = 151652, 151653, 151655, 151656, 151643
PATCH_DIM = 3 * 2 * 16 * 16


class Builder:
    """Accumulates one prompt: token ids plus the pixel rows and grids of its images/videos."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.ids: list[int] = []
        self.images: list[tuple[torch.Tensor, tuple]] = []
        self.videos: list[tuple[torch.Tensor, tuple]] = []

    def text(self, n: int) -> "Builder":
        self.ids += torch.randint(0, 150000, (n,), generator=self.g).tolist()
        return self

    def image(self, h: int, w: int) -> "Builder":
        self.ids += [VISION_START] + [IMAGE_PAD] * (h * w // 4) + [VISION_END]
        self.images.append((torch.randn(h * w, PATCH_DIM, generator=self.g), (1, h, w)))
        return self

    def video(self, t: int, h: int, w: int) -> "Builder":
        for _ in range(t):  # one timestamped block per temporal slice
            self.text(3)
            self.ids += [VISION_START] + [VIDEO_PAD] * (h * w // 4) + [VISION_END]
        self.videos.append((torch.randn(t * h * w, PATCH_DIM, generator=self.g), (t, h, w)))
        return self


def batch(*prompts: Builder) -> dict:
    """Left-pad prompts into one batch with the processor's keys."""
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p.ids):] = torch.tensor(p.ids)
        mask[i, width - len(p.ids):] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    for kind, key, gkey in (("images", "pixel_values", "image_grid_thw"), ("videos", "pixel_values_videos", "video_grid_thw")):
        items = [it for p in prompts for it in getattr(p, kind)]
        if items:
            out[key] = torch.cat([px for px, _ in items])
            out[gkey] = torch.tensor([g for _, g in items])
    return out


def mm_token_type_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """What the reference processor returns alongside input_ids (the reference model needs it)."""
    return (input_ids == IMAGE_PAD).int() + 2 * (input_ids == VIDEO_PAD).int()
