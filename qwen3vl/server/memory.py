"""Giving freed memory back to the OS after a media request.

A media request briefly holds tens to hundreds of MB (decoded pixels, patch rows, the vision
tower's activations). glibc keeps freed heap memory for reuse and, after large blocks are freed,
raises its mmap threshold so later large blocks come from that heap too: the server's RSS then
stays at its high-water mark, and the next large request adds to it. ``malloc_trim(0)`` returns the
free pages (a few ms); elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util

try:
    _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _trim = None


def release_free_memory() -> None:
    if _trim is not None:
        _trim(0)


__all__ = ["release_free_memory"]
