"""A/B speed check of the working tree against an earlier commit, in one run: the same
``qwen3vl bench`` worker (load, vision, prefill image+64, decode b=1 and b=8 on the same random
checkpoint) runs alternately from a git worktree of ``--base`` and from this checkout.

    python bench/bench_ab.py --base <commit> [--arch 2B] [--formats bfloat16,int8,int4] [--rounds 2]

Prints, per format, the best of the rounds for each side and the speed ratio (new / base for
rates, base / new for times: > 1 means the working tree is faster), then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qwen3vl import bench  # noqa: E402

RATES = ("decode_b1_tok_s", "decode_b8_tok_s")
TIMES = ("load_s", "vision_448_s", "prefill_image_64_s", "ttft_s")


def worker(tree: str, ckpt: str, fmt: str, args) -> dict:
    """One ``qwen3vl.bench`` worker run with the package imported from ``tree``."""
    quant = fmt if fmt in ("int8", "int4") else None
    cmd = [sys.executable, "-m", "qwen3vl.bench", "--worker", "ours", "--ckpt", ckpt,
           "--dtype", "bfloat16" if quant else fmt, "--threads", str(args.threads),
           "--new-tokens", str(args.new_tokens), "--context", str(args.context)]
    if quant:
        cmd += ["--quantization", quant]
    env = {**os.environ, "PYTHONPATH": tree}
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"worker in {tree} ({fmt}) failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def imported_from(tree: str) -> str:
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, "-c", "import qwen3vl; print(qwen3vl.__file__)"], cwd=tree, env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def best(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs]
    return max(values) if key in RATES else min(values)


def table(results: dict, formats: list[str]) -> dict:
    summary = {}
    print(f"\n{'format':<10}{'metric':<22}{'base':>10}{'new':>10}{'speed ratio':>13}")
    for fmt in formats:
        for key in RATES + TIMES:
            base, new = best(results[fmt]["base"], key), best(results[fmt]["new"], key)
            ratio = new / base if key in RATES else base / new
            summary[f"{fmt}:{key}"] = {"base": round(base, 4), "new": round(new, 4), "ratio": round(ratio, 3)}
            print(f"{fmt:<10}{key:<22}{base:>10.3f}{new:>10.3f}{ratio:>12.3f}x")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--arch", default="2B", choices=["tiny", *bench.ARCH_DIRS])
    ap.add_argument("--formats", default="bfloat16,int8,int4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()
    formats = args.formats.split(",")
    ckpt = bench.checkpoint(args.arch, "bfloat16")
    with tempfile.TemporaryDirectory(prefix="qwen3vl-ab-") as tmp:
        base_tree = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", base_tree, args.base], check=True,
                       capture_output=True)
        try:
            trees = {"base": base_tree, "new": ROOT}
            for side, tree in trees.items():
                print(f"{side}: {args.base if side == 'base' else 'working tree'} -> {imported_from(tree)}")
            results = {f: {"base": [], "new": []} for f in formats}
            for r in range(args.rounds):
                for fmt in formats:
                    for side in (("base", "new") if r % 2 == 0 else ("new", "base")):
                        results[fmt][side].append(worker(trees[side], ckpt, fmt, args))
                        print(f"round {r + 1} {fmt} {side}: done", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base_tree], capture_output=True)
    limits = bench.machine_limits(args.threads)
    print(f"\nA/B arch={args.arch} base={args.base} rounds={args.rounds} threads={args.threads}; "
          + ", ".join(f"{k}={v}" for k, v in limits.items()))
    summary = table(results, formats)
    print(json.dumps({"base": args.base, "arch": args.arch, "limits": limits, "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
