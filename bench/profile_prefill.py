"""Where the prefill time goes: image + 64 text tokens (the ``qwen3vl bench`` prefill) under the
PyTorch profiler, CPU time grouped by kind of op, against the machine's matrix peak.

Groups: matrix products (mm/addmm/bmm/linear/conv and our compiled GEMM ops), attention (SDPA and
our attention ops), pointwise/norm/rotary ops, copies and layout, the rest. For the matrix
products it reports the GFLOP/s they reach (their FLOPs from the model's shapes, as ``qwen3vl
bench`` counts them) vs a square GEMM of the same dtype: the gap between "prefill % of peak"
and 100 % splits into (1) time outside matrix products and (2) matrix products below peak
(small or skinny shapes). Prints a table, then ONE JSON line. Run alone. Usage:
    python bench/profile_prefill.py [--arch 2B] [--dtype bfloat16] [--quantization int8] [--no-weight-cache]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qwen3vl import Qwen3VL  # noqa: E402
from qwen3vl.bench import _best, _call_kwargs, _gemm_peak, _inputs, arch_config_from, checkpoint, prefill_flops  # noqa: E402

GROUPS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::convolution",
                "aten::_convolution", "mkldnn", "onednn", "gemm", "qwen3vl_kernels::linear", "_weight_int")),
    ("attention", ("scaled_dot_product", "attention", "_flash")),
    ("pointwise/norm/rope", ("rms_norm", "rope", "silu", "gelu", "aten::mul", "aten::add", "aten::pow", "aten::mean",
                             "aten::rsqrt", "aten::neg", "aten::cat", "aten::sigmoid", "aten::tanh", "aten::div",
                             "aten::sub", "aten::exp", "layer_norm", "native_layer_norm")),
    ("copy/layout", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "index",
                     "aten::empty", "aten::zeros", "aten::fill_", "aten::repeat", "scatter", "gather")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return group
    return "other"


def profile_prefill(model, kw: dict) -> tuple[dict, float]:
    """-> (self CPU seconds by group (top-level ops only, so nothing counts twice), wall seconds)."""
    with torch.inference_mode():
        model(**kw)
        wall = _best(lambda: model(**kw), 3)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(**kw)
    by_group: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        by_group[group_of(evt.key)] += evt.self_cpu_time_total / 1e6
    return dict(by_group), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="2B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-weight-cache", action="store_true",
                   help="weights copied into memory (bf16: fused q/k/v and gate/up) instead of mapped (split)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = checkpoint(args.arch, args.dtype)
    model = Qwen3VL.from_pretrained(path, dtype=getattr(torch, args.dtype), progress=False,
                                    quantization=args.quantization, weight_cache=not args.no_weight_cache)
    cfg = arch_config_from(path)
    img = _inputs(cfg, 1, 64, image=True)
    kw = dict(_call_kwargs("ours", img, cfg), logits_to_keep=1)
    by_group, wall = profile_prefill(model, kw)
    flops = prefill_flops(path, int(img["input_ids"].shape[1]))
    peak = _gemm_peak(torch.bfloat16 if args.quantization else getattr(torch, args.dtype)) * 1e9
    total = sum(by_group.values())
    scale = wall / total  # profiler overhead: shares are taken from the profile, seconds from the wall clock
    mm_s = by_group.get("matmul", 0.0) * scale
    fmt = args.quantization or args.dtype
    print(f"\nprefill of image + 64 tokens ({args.arch}, {fmt}, {args.threads} threads): {wall:.3f} s, "
          f"{flops / wall / 1e9:.0f} GFLOP/s = {100 * flops / wall / peak:.1f} % of the {peak / 1e9:.0f} GFLOP/s GEMM peak")
    print(f"{'group':>22} {'s':>8} {'share':>7}")
    for group in [g for g, _ in GROUPS] + ["other"]:
        s = by_group.get(group, 0.0) * scale
        print(f"{group:>22} {s:8.3f} {100 * s / wall:6.1f}%")
    print(f"matrix products alone: {flops / mm_s / 1e9:.0f} GFLOP/s = {100 * flops / mm_s / peak:.1f} % of peak "
          f"(the FLOPs of attention counted with them: a slight overestimate)")
    print(json.dumps({"bench": "profile_prefill", "arch": args.arch, "format": fmt, "threads": args.threads,
                      "weights": "copied" if args.no_weight_cache else "mapped",
                      "wall_s": wall, "gflops": flops / wall / 1e9, "peak_gflops": peak / 1e9,
                      "pct_of_peak": 100 * flops / wall / peak,
                      "seconds_by_group": {g: s * scale for g, s in by_group.items()},
                      "matmul_pct_of_peak": 100 * flops / mm_s / peak if mm_s else None}))


if __name__ == "__main__":
    main()
