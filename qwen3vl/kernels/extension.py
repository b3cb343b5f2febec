"""Building and loading the compiled CPU kernels: an explicit step (``build()``), run once at model
load; ``available()`` only reports its outcome.

The C++ sources next to this file (every ``*.cpp``, with every ``*.h`` in the build key) are
compiled with the system C++ compiler and ``-march=native`` into
``$QWEN3VL_HOME/torch_extensions/qwen3vl_kernels_<key>`` (default ``~/.cache/qwen3vl``), the key
a hash of the sources, torch and Python versions and the CPU (model name and flags: native code
is only valid on the CPU it was built for), and loaded as ``torch.ops.qwen3vl_kernels``. The
first build prints one line before compiling and its time after; later processes load the
cached library. Reasons the kernels are not used: QWEN3VL_NO_EXT=1, not x86-64, a CPU without
AVX-512 BF16/VNNI, no compiler, torch headers or ninja, or a failed build.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import platform
import shutil
import sys
import time
from typing import NamedTuple

import torch

from .. import env

_DIR = os.path.dirname(__file__)
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")
_NOT_BUILT = "not built: call qwen3vl.kernels.build() first"
_state: dict = {}  # "reason": None once loaded, else why not (absent until build() ran)


class BuildResult(NamedTuple):
    """``build()``'s outcome; true when the kernels are usable."""

    ok: bool
    reason: str | None  # why they are not usable (None when they are)

    def __bool__(self) -> bool:
        return self.ok


def sources() -> tuple[list[str], list[str]]:
    """(C++ sources, headers) of the extension, sorted: everything compiled or included."""
    return sorted(glob.glob(os.path.join(_DIR, "*.cpp"))), sorted(glob.glob(os.path.join(_DIR, "*.h")))


def _cpu_flags() -> tuple[str, str]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; empty strings elsewhere."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags":
                    flags = value.strip()
                    break
    except OSError:
        pass
    return model, flags


def _build_dir(source: bytes, model: str, flags: str) -> str:
    """Build folder for this source, torch, Python and CPU: -march=native code is only valid on
    the CPU it was built for."""
    key = hashlib.sha256(b"\0".join([source, torch.__version__.encode(), sys.version.encode(), model.encode(),
                                     flags.encode()])).hexdigest()[:16]
    return os.path.join(env.home(), "torch_extensions", f"qwen3vl_kernels_{key}")


def _check() -> str | None:
    """Why the kernels cannot be built here (None: they can)."""
    if env.no_ext():
        return "QWEN3VL_NO_EXT=1"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"no kernels for {platform.machine()}"
    missing = [f for f in _REQUIRED_FLAGS if f not in _cpu_flags()[1].split()]
    if missing:
        return "CPU lacks " + ", ".join(missing)
    try:
        from torch.utils import cpp_extension
    except ImportError as e:  # stripped-down torch builds
        return f"torch.utils.cpp_extension unavailable ({e})"
    if shutil.which(env.cxx()) is None:
        return f"no C++ compiler ({env.cxx()})"
    if not os.path.exists(os.path.join(cpp_extension.include_paths()[0], "torch", "library.h")):
        return "torch C++ headers not installed"
    if shutil.which("ninja") is None and _ninja_bin() is None:
        return "ninja not found (pip install ninja)"
    return None


def _ninja_bin() -> str | None:
    """The folder of the pip wheel's ninja (a dependency), whose venv bin may not be on PATH."""
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR


@contextlib.contextmanager
def _ninja_on_path():
    """PATH with the wheel's ninja for the duration of the build only, when none is on PATH."""
    old = os.environ.get("PATH")
    if shutil.which("ninja") is None and _ninja_bin() is not None:
        os.environ["PATH"] = _ninja_bin() + os.pathsep + (old or "")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def _load() -> str | None:
    """Compile (when not cached) and load the extension; None when loaded, else the reason."""
    reason = _check()
    if reason is not None:
        return reason
    from torch.utils import cpp_extension

    srcs, headers = sources()
    source = b""
    for path in srcs + headers:
        with open(path, "rb") as f:
            source += os.path.basename(path).encode() + b"\0" + f.read()
    build_dir = _build_dir(source, *_cpu_flags())
    os.makedirs(build_dir, exist_ok=True)
    prebuilt = os.path.exists(os.path.join(build_dir, "qwen3vl_kernels.so"))
    if not prebuilt:
        print("qwen3vl: compiling CPU kernels (one time) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        with _ninja_on_path():
            # -fopenmp only compiles at::parallel_for's pragma; the runtime is torch's libgomp.
            cpp_extension.load("qwen3vl_kernels", srcs, build_directory=build_dir, is_python_module=False,
                               extra_cflags=["-O3", "-march=native", "-fopenmp", "-w"], verbose=False)
    except Exception as e:  # compiler errors, missing libraries, ...
        msg = str(e).strip().splitlines()
        return f"build failed ({type(e).__name__}: {msg[-1] if msg else ''})"
    if not prebuilt:
        print(f"qwen3vl: compiled CPU kernels in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return None


def build() -> BuildResult:
    """Compile (first time on this CPU) and load the kernels; idempotent. Returns whether they
    are usable and, when not, why (also printed once to stderr)."""
    if "reason" not in _state:
        reason = _state["reason"] = _load()
        if reason is not None:
            print(f"qwen3vl: using stock CPU kernels ({reason})", file=sys.stderr)
    return BuildResult(_state["reason"] is None, _state["reason"])


def available() -> bool:
    """Whether the kernels are loaded (by an earlier ``build()``); never builds."""
    return _state.get("reason", _NOT_BUILT) is None


def unavailable_reason() -> str | None:
    """Why the kernels are not loaded (None when they are)."""
    return _state.get("reason", _NOT_BUILT)
