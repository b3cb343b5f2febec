"""CPU memory placement: freed activations stay in the process (glibc malloc), so they are reused
rather than re-faulted; weights ask for transparent huge pages.

A forward pass frees and reallocates the same few-MB activations hundreds of times. glibc returns
freed memory at the top of the heap to the OS once more than M_TRIM_THRESHOLD is free, and serves
blocks above its (dynamically moving) M_MMAP_THRESHOLD with fresh mmaps; either way the next
allocation page-faults on every 4 KiB page. In a 2-vCPU VM that measured 0-115k faults per 448x448
image encode (up to ~460 MB re-faulted, 40 ms of a 45 ms position-embedding step) depending on the
allocator's history. Fixing the mmap threshold at its maximum (32 MiB) and never trimming keeps
such blocks in the heap: RSS stays at its high-water mark instead of shrinking between requests.

Applied once when a CPU model is loaded; ``QWEN3VL_KEEP_HEAP=0`` leaves malloc alone. A no-op
outside glibc.

Decode streams every weight once per token. With 4 KiB pages that is a TLB miss every 4 KiB, and
in a VM each miss walks two levels of page tables; with 2 MiB pages (``madvise(MADV_HUGEPAGE)``
on the weights before they are first written, for kernels whose transparent huge pages are in
``madvise`` mode) the 2B bf16 layer stack streamed in 115-116 instead of 121-122 ms per token
(2 threads). ``QWEN3VL_HUGE_PAGES=0`` turns that off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

from . import env

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MADV_HUGEPAGE = 14  # linux/mman.h
_HUGE = 2 * 2**20
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit
_done: list[bool] = []


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def advise_huge_pages(tensors) -> int:
    """Ask for 2 MiB pages under each CPU tensor of at least 4 MiB (the whole 2 MiB-aligned pages
    inside it), before it is first written. Returns the bytes advised (0 where unsupported)."""
    if not env.huge_pages() or not os.path.exists("/sys/kernel/mm/transparent_hugepage"):
        return 0
    libc = _libc()
    madvise = getattr(libc, "madvise", None)
    if madvise is None:
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for t in tensors:
        nbytes = t.untyped_storage().nbytes() if t.device.type == "cpu" else 0
        if nbytes < 2 * _HUGE:
            continue
        start = t.untyped_storage().data_ptr()
        lo, hi = -(-start // _HUGE) * _HUGE, (start + nbytes) // _HUGE * _HUGE
        if hi > lo and madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0:
            advised += hi - lo
    return advised


def keep_heap() -> bool:
    """Tune malloc as described above; True when it was (now or earlier)."""
    if _done:
        return _done[0]
    ok = False
    if env.keep_heap():
        mallopt = getattr(_libc(), "mallopt", None)  # None: not glibc (musl, macOS, Windows)
        if mallopt is not None:
            ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**30))
    _done.append(ok)
    return ok
