"""Matrix-vector kernels for decode, streaming a 2B-shaped layer stack from memory.

Decode reads every weight once per token, so tokens/s is capped by memory bandwidth / bytes per
token; what matters is how close each kernel gets to that bandwidth on these shapes. Measures,
per weight format, GB/s of weights streamed and the implied tokens/s for the 2B decoder
(28 layers + lm_head). Prints a table and ONE JSON line last.

    python bench/bench_kernels.py [--layers 28] [--threads 2] [--batch 1] [--only int4]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from qwen3vl import kernels

# One 2B decoder layer (fused q/k/v, o, fused gate/up, down), as (out, in).
LAYER = [(4096, 2048), (2048, 2048), (12288, 2048), (2048, 6144)]
LM_HEAD = (151936, 2048)


def stream_rate(fn, mats, xs, reps: int = 3) -> float:
    """Seconds per pass over all matrices (best of ``reps``)."""
    for _ in range(1):
        for w, x in zip(mats, xs):
            fn(x, w)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for w, x in zip(mats, xs):
            fn(x, w)
        best = min(best, time.perf_counter() - t0)
    return best


def formats(shapes):
    """name -> (prepare(w_fp32) -> packed, fn(x_bf16, packed), bytes per weight)."""
    def int8(w):
        s = w.abs().amax(1) / 127
        return torch.round(w / s[:, None]).to(torch.int8), s.bfloat16()

    def int4(w, g=64):
        n, k = w.shape
        wg = w.view(n, k // g, g)
        lo, hi = wg.amin(-1), wg.amax(-1)
        sc = (hi - lo).clamp(min=1e-10) / 15
        q = torch.round((wg - lo[..., None]) / sc[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        sz = torch.stack([sc, lo + 8 * sc], -1).transpose(0, 1).contiguous().bfloat16()
        return torch._convert_weight_to_int4pack_for_cpu(q, 2), sz

    def int8_ours(w):
        q, s = int8(w)
        return q, s.float().view(-1, 1)

    def int4_ours(w, g=64):
        n, k = w.shape
        wg = w.view(n, k // g, g)
        lo, hi = wg.amin(-1), wg.amax(-1)
        sc = (hi - lo).clamp(min=1e-10) / 15
        q = torch.round((wg - lo[..., None]) / sc[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
        return (q[:, 0::2] | (q[:, 1::2] << 4)), sc.bfloat16().contiguous(), (lo + 8 * sc).bfloat16().contiguous()

    mk = torch.ops.mkldnn if hasattr(torch.ops, "mkldnn") else None
    out = {
        "fp32 F.linear": (lambda w: w, lambda x, w: F.linear(x.float(), w), 4),
        "bf16 F.linear": (lambda w: w.bfloat16(), lambda x, w: F.linear(x, w), 2),
        "bf16 torch.mv": (lambda w: w.bfloat16(), lambda x, w: torch.mv(w, x[0]), 2),
        "fp32 torch.mv": (lambda w: w, lambda x, w: torch.mv(w, x[0].float()), 4),
        "bf16 mm (K,N) layout": (lambda w: w.bfloat16().t().contiguous(), lambda x, w: x @ w, 2),
        "int8 _weight_int8pack_mm": (int8, lambda x, p: torch._weight_int8pack_mm(x, p[0], p[1]), 1),
        "int4 _weight_int4pack_mm (g64)": (int4, lambda x, p: torch._weight_int4pack_mm_for_cpu(x, p[0], 64, p[1]),
                                           0.5 + 4 / 64),
    }
    if kernels.build():
        out["int8 qwen3vl.kernels"] = (int8_ours, lambda x, p: kernels.compiled.int8_gemv(x, *p), 1)
        out["int4 qwen3vl.kernels (g64)"] = (int4_ours, lambda x, p: kernels.compiled.int4_gemv(x, *p, 64),
                                             0.5 + 4 / 64)
        out["bf16 qwen3vl.kernels"] = (lambda w: w.bfloat16(), kernels.compiled.bf16_gemv, 2)
    if mk is not None and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        out["bf16 mkldnn packed"] = (
            lambda w: torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 1),
            lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--batch", type=int, default=1, help="activation rows (torch.mv rows use the first)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shapes = LAYER * args.layers + [LM_HEAD]
    n_weights = sum(n * k for n, k in shapes)
    rows = []
    for name, (prep, fn, bpw) in formats(shapes).items():
        if args.only and args.only not in name:
            continue
        try:
            mats = [prep(torch.randn(s, generator=g) * 0.02) for s in shapes]
            xs = [torch.randn(args.batch, s[1], generator=g).bfloat16() for s in shapes]
            t = stream_rate(fn, mats, xs)
        except Exception as e:  # a kernel missing from this build
            print(f"{name}: unavailable ({type(e).__name__}: {e})")
            continue
        del mats
        gbps = n_weights * bpw / t / 1e9
        rows.append({"format": name, "ms_per_token": round(t * 1e3, 1), "GBps": round(gbps, 1),
                     "tok_s": round(1 / t, 2)})
    print(f"{'kernel':<34}{'ms/token':>10}{'GB/s':>8}{'tok/s':>8}")
    for r in rows:
        print(f"{r['format']:<34}{r['ms_per_token']:>10}{r['GBps']:>8}{r['tok_s']:>8}")
    print(json.dumps({"layers": args.layers, "threads": args.threads, "batch": args.batch, "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
