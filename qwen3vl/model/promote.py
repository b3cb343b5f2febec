"""Memory-mapped weights moved into anonymous huge-page memory, a piece at a time, while idle.

A mapped load (``weight_cache``) starts fast, but decode then streams the weights through the
page cache's pages, which many kernels map 4 KiB at a time: more TLB misses than the 2 MiB pages
of a copy (measured 9-44 % slower decode, BENCHMARKS.md). A long-running process can have both:
``Promoter.step`` copies up to ``max_bytes`` of the mapped tensors into anonymous memory with
transparent huge pages (``allocator.advise_huge_pages``) and, once a tensor is complete, swaps it
in place (``tensor.data = copy``: every holder of the tensor object sees the copy, bit for bit the
same values). The serving engine calls it on its stepping thread when it has no request, so a
piece never overlaps a forward pass and a request waits at most one piece (~64 MB of copying).

The tensor's old pages are then dropped from this process (``MADV_DONTNEED`` on the whole pages
inside it, only within the recorded file mappings): the process's memory grows by one tensor at
most. A view of a weight taken before the swap still reads the old range; being a clean
copy-on-write file mapping, it re-reads the file's (identical) bytes. Weights modified in place
before serving (copy-on-write pages) would lose that change in such views: the engine serves
models as loaded.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
from collections import deque

import torch

from ..allocator import advise_huge_pages

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # linux/mman.h


def address(buf: mmap.mmap) -> int:
    """Where ``buf`` (a writable or copy-on-write mapping) lies in this process."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) if len(buf) else 0


class Promoter:
    """``tensors``: the model's mapped parameters and buffers; ``ranges``: (start, end) addresses of
    the file mappings they were bound to (a tensor found elsewhere, e.g. replaced since, is left
    alone)."""

    def __init__(self, tensors: list[torch.Tensor], ranges: list[tuple[int, int]]):
        self.tensors = [t for t in tensors if t.device.type == "cpu" and t.numel() and t.is_contiguous()]
        self._todo = deque(self.tensors)
        self._ranges = ranges
        self._current: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (tensor, copy, bytes copied)
        self.moved = 0  # bytes swapped in so far

    def pending(self) -> bool:
        return self._current is not None or bool(self._todo)

    def _mapped(self, t: torch.Tensor) -> bool:
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        return any(a <= start and end <= b for a, b in self._ranges)

    @torch.no_grad()
    def step(self, max_bytes: int = 64 * 2**20) -> int:
        """Copy up to about ``max_bytes``, swapping in every tensor completed -> bytes copied."""
        copied = 0
        while copied < max_bytes and self.pending():
            if self._current is None:
                t = self._todo.popleft()
                if not self._mapped(t):
                    continue
                new = torch.empty_like(t, memory_format=torch.contiguous_format)
                advise_huge_pages([new])  # before its first write
                self._current = (t, new, 0)
            t, new, done = self._current
            src, dst = t.view(-1).view(torch.uint8), new.view(-1).view(torch.uint8)  # (bytes,)
            n = min(max_bytes - copied, src.numel() - done)
            dst[done : done + n].copy_(src[done : done + n])
            copied, done = copied + n, done + n
            self._current = (t, new, done)
            if done == src.numel():
                self._swap(t, new)
                self._current = None
        return copied

    def idle_step(self) -> None:
        """``step`` for the server's idle loop: an error (out of memory, say) stops the moving with a
        warning; what was not moved yet stays mapped (slower, not wrong)."""
        try:
            self.step()
        except (RuntimeError, MemoryError, OSError) as e:
            self._todo.clear()
            self._current = None
            print(f"qwen3vl: weights stay memory-mapped ({e})", file=sys.stderr, flush=True)

    def _swap(self, t: torch.Tensor, new: torch.Tensor) -> None:
        start, nbytes = t.data_ptr(), t.numel() * t.element_size()
        t.data = new
        self.moved += nbytes
        lo, hi = -(-start // _PAGE) * _PAGE, (start + nbytes) // _PAGE * _PAGE  # whole pages inside it
        if hi > lo:
            _madvise(lo, hi - lo, _MADV_DONTNEED)


def _madvise(addr: int, length: int, advice: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    fn = getattr(libc, "madvise", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn(addr, length, advice)
