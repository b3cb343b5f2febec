"""``python -m qwen3vl.model.weight_cache_cli [--clear]``: list (or delete) the converted-weight
cache of ``qwen3vl.model.weight_cache`` under ``$QWEN3VL_HOME/weights``."""
from __future__ import annotations

import argparse
import glob
import os
import sys

from .weight_cache import _remove
from .weight_cache_key import cache_dir


def clear() -> tuple[int, int]:
    """Delete every cache file -> (files, bytes)."""
    files = glob.glob(os.path.join(cache_dir(), "*.qwc")) + glob.glob(os.path.join(cache_dir(), "*.qwc.tmp*"))
    return len(files), sum(_remove(fn) for fn in files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwen3vl.model.weight_cache_cli",
                                 description="list or delete the converted-weight cache")
    ap.add_argument("--clear", action="store_true", help="delete every cached file")
    args = ap.parse_args(argv)
    files = sorted(glob.glob(os.path.join(cache_dir(), "*.qwc")))
    if args.clear:
        n, size = clear()
        print(f"removed {n} file(s), {size / 2**30:.2f} GiB, from {cache_dir()}")
        return 0
    for fn in files:
        print(f"{os.path.getsize(fn) / 2**30:8.2f} GiB  {fn}")
    print(f"{len(files)} file(s) in {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
