"""The converted-weight cache's file names and keys (``qwen3vl.model.weight_cache``).

The key hashes the format (dtype, quantization, int4 group size), the source of the modules that
define the layout, ``config.json``, and per checkpoint file its name, size, mtime, safetensors
header and 16 samples of 4 KiB. Trade-off: hashing every byte (seconds per GB) would defeat the
purpose; a rewrite keeping size, mtime, header and the samples would go unnoticed.
"""
from __future__ import annotations

import hashlib
import os

import torch

from .. import env

MAGIC = b"QWEN3VL-WCACHE1\0"  # 16 bytes; a new layout changes it
_LAYOUT_SOURCES = ("weights.py", "fp8.py", "quant.py", "config.py", "model/text.py", "model/vision.py",
                   "model/qwen3vl.py", "model/weight_cache.py", "model/weight_cache_key.py")


def cache_dir() -> str:
    return os.path.join(env.home(), "weights")


def format_name(dtype: torch.dtype, quantization: str | None, group_size: int) -> str:
    name = str(dtype).replace("torch.", "")
    return f"{name}-{quantization}" + (f"-g{group_size}" if quantization == "int4" else "") if quantization else name


def _code_digest() -> bytes:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for rel in _LAYOUT_SOURCES:
        with open(os.path.join(root, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read())
    return h.digest()


def _file_digest(h, fn: str) -> None:
    st = os.stat(fn)
    h.update(f"{os.path.basename(fn)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    with open(fn, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        h.update(head + f.read(min(n, 256 * 2**20)))
        for i in range(16):  # sampled bytes spread over the file
            f.seek(st.st_size * i // 16)
            h.update(f.read(4096))


def cache_key(path: str, files: list[str], fmt: str) -> str:
    """Hash of everything the converted weights depend on (see the module docstring)."""
    h = hashlib.sha256(MAGIC + fmt.encode() + _code_digest())
    with open(os.path.join(path, "config.json"), "rb") as f:
        h.update(f.read())
    for fn in files:
        _file_digest(h, fn)
    return h.hexdigest()[:32]


def cache_path(path: str, fmt: str, key: str) -> str:
    where = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), f"{os.path.basename(os.path.normpath(path))}-{where}-{fmt}-{key}.qwc")
