"""Vision encoder cache: an image or video seen before is not encoded again.

A prompt's media are split into items (its images in order, then its videos), each keyed by a
hash of its processed pixel rows and its grid: the pixels already reflect every processing
option that changes them (sizes, fps, frame indices), so two items with one key give the same
features wherever they stand in a prompt. The cache keeps, per key, the merged features AND the
DeepStack features (the decoder adds the latter at the visual tokens of its first layers; reusing
only the former would silently change results), least recently used first out under a byte budget.

``tail_media`` gives the features of the placeholder tokens from some token on (the part of a
prompt that the prefix cache did not cover): items wholly before it are never encoded, the rest
come from the cache or from one encoder call over the misses. ``encode_pieces`` encodes the misses
beforehand in pieces of a few video frames (the encoder attends within one frame, so a piece's
features are those rows of the whole video's), so that the engine can decode running requests
between the pieces of a long video.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# Per item: (merged features (n, H), [DeepStack features (n, H)] per layer).
Features = tuple[torch.Tensor, list[torch.Tensor]]


@dataclass(frozen=True)
class MediaItem:
    key: bytes  # content hash: pixel rows + grid
    pixels: torch.Tensor  # (N, C*T*P*P) this item's pixel rows
    grid: torch.Tensor  # (3,) long: t, h, w in patches
    tokens: int  # placeholder tokens in the prompt: t*h*w / merge**2
    video: bool


def media_key(pixels: torch.Tensor, grid: torch.Tensor) -> bytes:
    """blake2b over the pixel rows' bytes, their dtype and shape, and the grid."""
    h = hashlib.blake2b(digest_size=16)
    flat = pixels.detach().contiguous().cpu()
    h.update(f"{flat.dtype}{tuple(flat.shape)}{grid.tolist()}".encode())
    h.update(memoryview(flat.view(torch.uint8).numpy()))  # no copy: hashlib reads the buffer
    return h.digest()


def media_items(inputs: dict, merge: int, hashed: bool = True) -> list[MediaItem] | None:
    """A prompt's images (in order), then its videos. None where the pixel rows and grids
    disagree: such a prompt takes the uncached path, which reports the error. ``hashed=False``
    (nothing is cached): each item is keyed by its index instead of its content."""
    items = []
    for pix_key, grid_key, video in (("pixel_values", "image_grid_thw", False),
                                     ("pixel_values_videos", "video_grid_thw", True)):
        pixels, grids = inputs.get(pix_key), inputs.get(grid_key)
        if pixels is None:
            continue
        if grids is None:
            return None
        grids = grids.reshape(-1, 3).to(torch.long).cpu()  # (items, 3)
        rows = grids.prod(-1).tolist()
        if sum(rows) != pixels.shape[0] or any(n % (merge * merge) for n in rows):
            return None
        for part, grid, n in zip(pixels.split(rows), grids, rows):
            key = media_key(part, grid) if hashed else len(items).to_bytes(4, "little")
            items.append(MediaItem(key, part, grid, n // (merge * merge), video))
    return items


def owners(ids: torch.Tensor, items: list[MediaItem], image_id: int, video_id: int) -> torch.Tensor | None:
    """ids (T,) -> (T,) long: index into ``items`` of the item each placeholder token belongs to,
    -1 for other tokens; None where the placeholder counts and the items disagree."""
    out = torch.full(ids.shape, -1, dtype=torch.long)
    ids = ids.cpu()
    for video, tok in ((False, image_id), (True, video_id)):
        index = [i for i, it in enumerate(items) if it.video == video]
        sizes = torch.tensor([items[i].tokens for i in index], dtype=torch.long)
        where = ids == tok
        if int(where.sum()) != int(sizes.sum()):
            return None
        out[where] = torch.tensor(index, dtype=torch.long).repeat_interleave(sizes)
    return out


class EncoderCache:
    """Features by media key, least recently used first out past ``budget`` bytes (0: keeps
    nothing, still encodes each distinct item of a call once). ``encoded`` counts the items run
    through the encoder."""

    def __init__(self, budget: int):
        self.budget, self.used, self.encoded = budget, 0, 0
        self._entries: OrderedDict[bytes, Features] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def features(self, model, items: list[MediaItem], known: dict[bytes, Features] | None = None) -> list[Features]:
        """Each item's features: ``known`` ones (key -> features) and cached ones reused, the
        distinct misses encoded in one call."""
        found = dict(known or {})
        for it in items:
            if it.key in found:
                continue
            if it.key in self._entries:
                self._entries.move_to_end(it.key)
                found[it.key] = self._entries[it.key]
        misses = list({it.key: it for it in items if it.key not in found}.values())
        if misses:
            fresh = model.encode_items([it.pixels for it in misses], [it.grid for it in misses])
            self.encoded += len(misses)
            for it, feats in zip(misses, fresh):
                found[it.key] = feats
                self._put(it.key, feats)
        return [found[it.key] for it in items]

    def _put(self, key: bytes, feats: Features) -> None:
        size = sum(t.numel() * t.element_size() for t in (feats[0], *feats[1]))
        if size > self.budget:
            return
        while self.used + size > self.budget:
            _, old = self._entries.popitem(last=False)
            self.used -= sum(t.numel() * t.element_size() for t in (old[0], *old[1]))
        self._entries[key] = feats
        self.used += size


    def encode_pieces(self, model, items: list[MediaItem], budget: Callable[[], int],
                      out: dict[bytes, Features]) -> Iterator[None]:
        """Encode the items neither cached nor in ``out`` into ``out`` (and the cache), in pieces
        of whole frames of at most ``budget()`` tokens (asked before each piece; at least one
        frame), yielding after each piece."""
        todo = list({it.key: it for it in items if it.key not in out and it.key not in self._entries}.values())
        while todo:
            if budget() >= sum(it.tokens for it in todo):  # all at once: one encoder call
                for it, feats in zip(todo, self.features(model, todo)):
                    out[it.key] = feats
                return
            it = todo.pop(0)
            t, h, w = it.grid.tolist()
            per_frame, parts, done = it.tokens // t, [], 0
            while done < t:
                n = min(t - done, max(1, budget() // per_frame))
                rows = it.pixels[done * h * w : (done + n) * h * w]  # a video's rows are frame-major
                parts.append(model.encode_items([rows], [torch.tensor([n, h, w])])[0])
                done += n
                yield
            feats = (torch.cat([p[0] for p in parts]), [torch.cat(d) for d in zip(*(p[1] for p in parts))])
            self.encoded += 1
            self._put(it.key, feats)
            out[it.key] = feats


def after_cut(items: list[MediaItem], before: tuple[int, int]) -> tuple[list[MediaItem], list[int]]:
    """The items with placeholder tokens after a cut that has ``before`` = (image tokens, video
    tokens) ahead of it, and how many of each one's tokens lie before the cut."""
    needed, skip = [], []
    for video, ahead in ((False, before[0]), (True, before[1])):
        start = 0
        for it in (i for i in items if i.video == video):
            if start + it.tokens > ahead:
                needed.append(it)
                skip.append(max(ahead - start, 0))  # rows of this item before the cut
            start += it.tokens
    return needed, skip


def tail_media(model, cache: EncoderCache, items: list[MediaItem], before: tuple[int, int],
               known: dict[bytes, Features] | None = None):
    """Features of the image and of the video placeholder tokens after a cut, ``before`` = (image
    tokens, video tokens) ahead of it -> (image, video): each (features (n, H), [DeepStack (n, H)])
    of those tokens in order, or None where the tail has none. A cut inside an item takes the rows
    of its tokens after the cut. ``known``: features already encoded (``EncoderCache.encode_pieces``)."""
    needed, skip = after_cut(items, before)
    feats = cache.features(model, needed, known) if needed else []
    out = []
    for video in (False, True):
        parts = [(f, s) for it, f, s in zip(needed, feats, skip) if it.video == video]
        if not parts:
            out.append(None)
            continue
        merged = torch.cat([f[0][s:] for f, s in parts])  # (n, H)
        deep = [torch.cat([f[1][i][s:] for f, s in parts]) for i in range(len(parts[0][0][1]))]
        out.append((merged, deep))
    return tuple(out)
