"""Mapped weights vs the same weights moved into huge-page memory while idle (``model/promote.py``).

One fresh process per format: load (memory-mapped), move every mapped tensor into anonymous
huge-page memory as the server's idle loop does (its time; RSS before, after and at peak), then
decode 32 greedy tokens of a 16-token prompt ``--runs`` times with the mapped and the moved
tensors alternately swapped in (``tensor.data``; the mapped ones re-read the same file pages), so
both see the same drift of this VM. ``--ckpt`` another folder: e.g. a copy written 4 KiB at a
time, whose page cache then has 4 KiB folios (what kernels without large folios always have).
2B architecture, random weights. Prints a table, then ONE JSON line. Run alone. ~2 min a format:
    python bench/bench_promote.py [--arch 2B] [--formats bf16 int8] [--runs 6] [--ckpt DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

FORMATS = {"bf16": None, "int8": "int8", "int4": "int4"}


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


def _decode_ms(model, runs: int) -> list[float]:
    import torch

    ids = torch.tensor([list(range(1000, 1016))])
    out = []
    for _ in range(runs):
        t = []
        for n in (2, 34):
            t0 = time.perf_counter()
            model.generate(input_ids=ids, max_new_tokens=n, do_sample=False)
            t.append(time.perf_counter() - t0)
        out.append((t[1] - t[0]) / 32 * 1000)
    return out


def child(path: str, fmt: str, runs: int) -> dict:
    from qwen3vl import Qwen3VL
    from qwen3vl.bench import peak_rss_gb

    model = Qwen3VL.from_pretrained(path, dtype="bfloat16", quantization=FORMATS[fmt], progress=False)
    tensors = model.mapped.tensors
    mapped = [t.data for t in tensors]
    _decode_ms(model, 1)  # every mapped page touched once
    rss, t0 = _rss_gb(), time.perf_counter()
    while model.mapped.pending():
        model.mapped.step()
    res = {"promote_s": time.perf_counter() - t0, "moved_gb": model.mapped.moved / 2**30, "rss_before_gb": rss,
           "rss_after_gb": _rss_gb(), "peak_rss_gb": peak_rss_gb(), "mapped_ms": [], "moved_ms": []}
    moved = [t.data for t in tensors]
    for _ in range(runs):
        for name, data in (("mapped_ms", mapped), ("moved_ms", moved)):
            for t, d in zip(tensors, data):
                t.data = d
            res[name] += _decode_ms(model, 1)
    with open("/proc/self/smaps_rollup") as f:
        res["file_pmd_mapped_gb"] = next(int(x.split()[1]) for x in f if x.startswith("FilePmdMapped:")) / 2**20
    return res


def _stats(xs: list[float]) -> str:
    return f"{min(xs):7.1f} {sorted(xs)[len(xs) // 2]:7.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="2B")
    ap.add_argument("--formats", nargs="+", default=["bf16", "int8"], choices=list(FORMATS))
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--ckpt", help="checkpoint folder (default: the random one of --arch)")
    ap.add_argument("--child", choices=list(FORMATS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    from qwen3vl.bench import checkpoint

    path = args.ckpt or checkpoint(args.arch, "bfloat16")
    if args.child:
        print(json.dumps(child(path, args.child, args.runs)))
        return 0
    results = {}
    for fmt in args.formats:
        cmd = [sys.executable, os.path.abspath(__file__), "--runs", str(args.runs), "--ckpt", path, "--child", fmt]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[fmt] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"decode ms/token, {path}, 32 tokens, best / median of {args.runs} alternated runs")
    print(f"{'':<6} {'mapped':>15} {'moved':>15}  {'2M-mapped':>9}  move s  RSS GB before/after/peak")
    for fmt, r in results.items():
        print(f"{fmt:<6} {_stats(r['mapped_ms'])} {_stats(r['moved_ms'])}  {r['file_pmd_mapped_gb']:7.2f}GB  "
              f"{r['promote_s']:6.2f}  {r['rss_before_gb']:.2f} / {r['rss_after_gb']:.2f} / {r['peak_rss_gb']:.2f}")
    print(json.dumps({"bench": "promote", "arch": args.arch, "ckpt": path, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
