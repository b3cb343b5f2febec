"""The reference side of ``qwen3vl bench``: the same worker, with the model loaded by
``transformers`` (a test dependency, kept out of the package). Run by the harness as
``python bench/reference_worker.py --worker ref --ckpt PATH --dtype ...``; not meant to be run
by hand."""
from __future__ import annotations

import sys

import torch


def load(path: str, dtype: str):
    import transformers

    return transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


if __name__ == "__main__":
    from qwen3vl import bench

    sys.exit(bench.main(sys.argv[1:], load_reference=load))
