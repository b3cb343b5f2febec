"""Settings read from the environment, in one place (the bottom layer: imports nothing of ours).

Each function reads its variable when called, so a test or a launcher that sets one before the
first use (or monkeypatches it) is honoured.

    QWEN3VL_HOME          cache folder: demo checkpoint, compiled kernels, converted weights (default ~/.cache/qwen3vl)
    QWEN3VL_NO_EXT=1      never build or load the compiled CPU kernels (stock PyTorch ops instead)
    QWEN3VL_HUGE_PAGES=0  do not madvise transparent huge pages under CPU weights, nor move mapped
                          weights into them while the server idles (``qwen3vl.model.promote``)
    QWEN3VL_KEEP_HEAP=0   leave glibc's heap trimming as it is (see ``qwen3vl.allocator``)
    QWEN3VL_NO_WEIGHT_CACHE=1  load without mapped weights or the converted-weight cache
                          (``qwen3vl.model.weight_cache``)
    QWEN3VL_NO_PROGRESS   set: no progress bar while loading weights
    QWEN3VL_TP_THREADS    compute threads per tensor-parallel rank (default: cores / local ranks)
    QWEN3VL_TP_TIMEOUT    seconds a tensor-parallel collective may wait (default 600)
    CXX                   the C++ compiler for the kernels (default ``c++``)
"""
from __future__ import annotations

import os


def home() -> str:
    return os.environ.get("QWEN3VL_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "qwen3vl")


def no_ext() -> bool:
    return os.environ.get("QWEN3VL_NO_EXT") == "1"


def huge_pages() -> bool:
    return os.environ.get("QWEN3VL_HUGE_PAGES", "1") != "0"


def keep_heap() -> bool:
    return os.environ.get("QWEN3VL_KEEP_HEAP", "1") != "0"


def no_weight_cache() -> bool:
    return os.environ.get("QWEN3VL_NO_WEIGHT_CACHE", "0") not in ("0", "")


def progress_disabled() -> bool:
    return os.environ.get("QWEN3VL_NO_PROGRESS") is not None


def tp_threads() -> int | None:
    value = os.environ.get("QWEN3VL_TP_THREADS")
    return int(value) if value else None


def tp_timeout() -> float:
    return float(os.environ.get("QWEN3VL_TP_TIMEOUT") or 600)


def cxx() -> str:
    return os.environ.get("CXX", "c++")
