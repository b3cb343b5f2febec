"""Benchmark harness: qwen3vl against the reference implementation on the same random weights.

    python -m qwen3vl.bench --arch 2B --dtype bfloat16        (also: qwen3vl bench ...)

Builds (once, cached) a random-weight checkpoint of a real architecture in the released layout,
then runs each implementation in its own subprocess (so peak RSS is its own) and measures: load
time, vision encode of a 448x448 image, prefill of image + 64 text tokens, time to first token,
decode tokens/s at batch 1 and batch 8 with a 256-token context. It also measures the machine's
limits (memory read bandwidth, GEMM GFLOP/s) and prints a table, then ONE JSON line last.
The reference side runs ``bench/reference_worker.py`` of a source checkout, which loads it with
`transformers` (a test dependency; the package itself never imports it); `--skip-reference`
runs ours alone.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import torch
from torch import nn

from . import env
from .demo import demo_checkpoint
from .engine.hf import Qwen3VL
from .quant import quantize_modules
from .random_checkpoint import TINY_CONFIG, write_random_checkpoint

ARCH_DIRS = {
    "2B": "Qwen3-VL-2B-Instruct", "4B": "Qwen3-VL-4B-Instruct", "8B": "Qwen3-VL-8B-Instruct",
    "32B": "Qwen3-VL-32B-Instruct", "30B-A3B": "Qwen3-VL-30B-A3B-Instruct",
}
# The released config.json of each architecture ships with the package (provenance: SOURCES.md there).
ARCH_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "configs")
IMAGE_GRID = (1, 28, 28)  # a 448x448 image: 28x28 patches of 16 px, 196 tokens after merging


def peak_rss_gb() -> float:
    """This process's peak RSS in GiB (``VmHWM``). Not ``getrusage``: Linux keeps ru_maxrss across
    execve, so a child started by a parent that once held more would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # elsewhere: the best there is


def arch_config(arch: str) -> dict:
    if arch == "tiny":
        return TINY_CONFIG
    path = os.path.join(ARCH_CONFIGS, ARCH_DIRS[arch], "config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def checkpoint(arch: str, dtype: str) -> str:
    """Random-weight checkpoint of ``arch`` in the released layout, cached on disk."""
    path = os.path.join(env.home(), f"bench-{arch}-{dtype}")
    if not os.path.isfile(os.path.join(path, "DONE")):
        print(f"writing random {arch} checkpoint ({dtype}) to {path} ...", file=sys.stderr)
        cfg = dict(arch_config(arch))
        cfg["torch_dtype"] = dtype
        write_random_checkpoint(path, cfg, seed=0, dtype=getattr(torch, dtype))
        with open(os.path.join(path, "DONE"), "w"):
            pass
    return path


def with_tokenizer(path: str) -> str:
    """A weights-only bench checkpoint completed with the demo's real tokenizer, template and
    processor configs (for benches that go through the processor or the server)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "video_preprocessor_config.json"):
        if not os.path.exists(os.path.join(path, name)):
            shutil.copy(os.path.join(demo_checkpoint(), name), path)
    return path


# ---------------------------------------------------------------------- machine limits
def machine_limits(threads: int) -> dict:
    torch.set_num_threads(threads)
    x = torch.ones(256 * 2**20, dtype=torch.float32)  # 1 GiB: far larger than any cache
    x.sum()
    t = _best(lambda: x.sum(), 5)
    bandwidth = x.numel() * 4 / t / 1e9
    out = {"mem_read_GBps": round(bandwidth, 1)}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out[f"gemm_{name}_GFLOPs"] = round(_gemm_peak(dt), 1)
    return out


def _gemm_peak(dtype: torch.dtype) -> float:
    """GFLOP/s of a square matmul, 2048 wide, or smaller where the CPU has no fast path for the
    dtype (bf16 without AVX-512 BF16 / AMX runs at ~1 GFLOP/s: 2048^3 would take ~20 s a call)."""
    n = 256
    while n < 2048:
        a = torch.randn(n, n, dtype=dtype)
        if _best(lambda: a @ a, 1) > 0.05:
            break
        n *= 2
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _best(lambda: a @ b, 5) / 1e9


def _best(fn, n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------- worker (one implementation)
def _inputs(cfg: dict, batch: int, text: int, image: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150000, (batch, text), generator=g)
    out = {}
    if image:
        n = IMAGE_GRID[1] * IMAGE_GRID[2] // 4
        start, pad, end = cfg["vision_start_token_id"], cfg["image_token_id"], cfg["vision_end_token_id"]
        vis = torch.tensor([start] + [pad] * n + [end]).expand(batch, -1)
        ids = torch.cat([ids[:, :8], vis, ids[:, 8:]], 1)
        out["pixel_values"] = torch.randn(batch * IMAGE_GRID[1] * IMAGE_GRID[2], 1536, generator=g)
        out["image_grid_thw"] = torch.tensor([IMAGE_GRID] * batch)
    out["input_ids"] = ids
    out["attention_mask"] = torch.ones_like(ids)
    return out


# The reference's loader lives outside the package, next to the other benchmarks.
REFERENCE_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "reference_worker.py")


def _load(impl: str, path: str, dtype: str, quantization: str | None = None, load_reference=None):
    if impl == "ours":
        return Qwen3VL.from_pretrained(path, dtype=getattr(torch, dtype), progress=False, quantization=quantization)
    if load_reference is None:
        raise RuntimeError(f"the reference worker runs through {REFERENCE_WORKER}")
    return load_reference(path, dtype)


def _call_kwargs(impl: str, inputs: dict, cfg: dict) -> dict:
    """The reference wants the token types of the prompt too (1 image, 2 video)."""
    if impl == "ours":
        return inputs
    ids = inputs["input_ids"]
    return dict(inputs, mm_token_type_ids=(ids == cfg["image_token_id"]).int() + 2 * (ids == cfg["video_token_id"]).int())


class _Clock:
    """A generate() streamer that notes when each step's tokens arrive (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, ids) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _gen_time(impl, model, inputs, n: int, cfg: dict) -> float:
    """Wall time of ``generate`` for exactly n new greedy tokens."""
    return _generate_timed(impl, model, inputs, n, cfg)[0]


def _decode_rate(impl, model, inputs, n: int, cfg: dict) -> float:
    """Tokens/s of steps 2..n, timed between the first and last new token, so the prefill (and
    its run-to-run noise, large next to a few decode steps at batch 8) is not in the figure."""
    times = _generate_timed(impl, model, inputs, n, cfg)[1][1:]  # one per new token
    return inputs["input_ids"].shape[0] * (len(times) - 1) / (times[-1] - times[0])


def _generate_timed(impl, model, inputs, n: int, cfg: dict):
    clock = _Clock()
    kw = dict(_call_kwargs(impl, inputs, cfg), max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**kw)
    dt = time.perf_counter() - t0
    assert out.shape[1] == inputs["input_ids"].shape[1] + n and len(clock.times) == n + 1
    return dt, clock.times


def worker(impl: str, path: str, dtype: str, threads: int, new_tokens: int, context: int,
           quantization: str | None = None, load_reference=None) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = _load(impl, path, dtype, quantization, load_reference)
    res = {"load_s": time.perf_counter() - t0}
    cfg = arch_config_from(path)
    visual = model.model.visual
    img = _inputs(cfg, 1, 64, image=True)
    with torch.inference_mode():
        pv, grid = img["pixel_values"].to(getattr(torch, dtype)), img["image_grid_thw"]
        run = (lambda: visual(pv, grid)) if impl == "ours" else (lambda: visual(pv, grid_thw=grid))
        run()
        res["vision_448_s"] = _best(run, 3)
        kw = dict(_call_kwargs(impl, img, cfg), logits_to_keep=1)
        model(**kw)
        res["prefill_image_64_s"] = _best(lambda: model(**kw), 3)
        res["prefill_tokens"] = int(img["input_ids"].shape[1])
    res["ttft_s"] = min(_gen_time(impl, model, img, 1, cfg) for _ in range(2))
    for b, n in ((1, new_tokens), (8, max(8, new_tokens // 2))):
        ctx = _inputs(cfg, b, context, image=False, seed=1)
        # Best of a few runs, like the other timings: a few dozen steps of a small model are
        # short enough for a single run to catch a scheduler hiccup.
        res[f"decode_b{b}_tok_s"] = max(_decode_rate(impl, model, ctx, n + 1, cfg) for _ in range(3 if b == 1 else 2))
    res["peak_rss_GB"] = peak_rss_gb()
    return res


def arch_config_from(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)


FORMATS = ("float32", "bfloat16", "int8", "int4")


def decode_bytes(path: str, fmt: str) -> int:
    """Bytes of weights one decode step reads: the text decoder + lm_head (one embedding row is
    negligible), bytes counted on the model as that format lays it out (codes, scales and zeros
    of the quantized layers, ``qwen3vl.quant.layer_mode`` per layer), built on the meta device."""
    meta = Qwen3VL.from_config(path, device="meta")
    if fmt in ("int8", "int4"):
        meta = meta.to(torch.bfloat16)
        quantize_modules(meta, fmt)
    else:
        meta = meta.to(getattr(torch, fmt))
    text = meta.model.language_model
    tensors = [t for m in (text.layers, text.norm, meta.lm_head) for t in (*m.parameters(), *m.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors)


def prefill_flops(path: str, text_tokens: int) -> float:
    """Multiply-add FLOPs of the image + text prefill (``logits_to_keep=1``): the vision
    encoder's linear layers over its patches (mergers over the merged tokens) and its attention,
    the text decoder's linear layers over every token and its causal attention, one lm_head row.
    Norms, activations and rotary embeddings are left out (a few %)."""
    meta = Qwen3VL.from_config(path, device="meta")
    patches = IMAGE_GRID[0] * IMAGE_GRID[1] * IMAGE_GRID[2]
    vis = meta.model.visual
    flops = 0.0
    for name, m in vis.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            rows = patches // vis.cfg.spatial_merge_size**2 if "merger" in name else patches
            flops += 2 * m.weight.numel() * rows
    flops += 4 * patches**2 * vis.cfg.hidden_size * vis.cfg.depth  # q k^T and p v, full attention per image
    text = meta.model.language_model
    tc = meta.config.text
    flops += 2 * sum(m.weight.numel() for m in text.layers.modules() if isinstance(m, nn.Linear)) * text_tokens
    flops += 2 * text_tokens**2 * tc.num_attention_heads * tc.head_dim * tc.num_hidden_layers  # causal: half
    return flops + 2 * meta.lm_head.weight.numel()


# ---------------------------------------------------------------------- driver
def run_worker_subprocess(impl: str, args, path: str, fmt: str) -> dict:
    quant = fmt if fmt in ("int8", "int4") else None
    dtype = "bfloat16" if quant else fmt
    program = [REFERENCE_WORKER] if impl == "ref" else ["-m", "qwen3vl.bench"]
    cmd = [sys.executable, *program, "--worker", impl, "--ckpt", path, "--dtype", dtype,
           "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--context", str(args.context)]
    if quant:
        cmd += ["--quantization", quant]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{impl} ({fmt}) worker failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


KEYS = ["load_s", "vision_448_s", "prefill_image_64_s", "ttft_s", "decode_b1_tok_s", "decode_b8_tok_s", "peak_rss_GB"]


def report(args, limits: dict, results: dict, path: str) -> dict:
    """Table: one column per run ("ours:<format>", "ref:<dtype>"), speedups vs the reference."""
    cols = list(results)
    ref = next((c for c in cols if c.startswith("ref")), None)
    print(f"\nqwen3vl bench: arch={args.arch} threads={args.threads} context={args.context} "
          f"new_tokens={args.new_tokens}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
          + ", ".join(f"{k}={v}" for k, v in limits.items()))
    print(f"{'metric':<24}" + "".join(f"{c:>16}" for c in cols))
    print("-" * (24 + 16 * len(cols)))
    for k in KEYS:
        print(f"{k:<24}" + "".join(f"{results[c][k]:>16.3f}" for c in cols))
    summary = {"arch": args.arch, "threads": args.threads, "limits": limits, "runs": {}}
    peak = {"bfloat16": limits["gemm_bf16_GFLOPs"], "float32": limits["gemm_fp32_GFLOPs"]}
    for c in cols:
        fmt = c.split(":", 1)[1]
        r = results[c]
        bytes_tok = decode_bytes(path, fmt)
        limit = limits["mem_read_GBps"] * 1e9 / bytes_tok
        gflops = prefill_flops(path, r["prefill_tokens"]) / r["prefill_image_64_s"] / 1e9
        row = dict(r, bytes_per_token=bytes_tok, decode_limit_tok_s=round(limit, 2),
                   pct_of_bandwidth_limit=round(100 * r["decode_b1_tok_s"] / limit, 1),
                   prefill_GFLOPs=round(gflops, 1),
                   pct_of_gemm_peak=round(100 * gflops / peak.get(fmt, peak["bfloat16"]), 1))
        if ref and c != ref:
            for k in ("decode_b1_tok_s", "decode_b8_tok_s"):
                row[k + "_vs_ref"] = round(r[k] / results[ref][k], 2)
            for k in ("vision_448_s", "prefill_image_64_s", "ttft_s"):
                row[k + "_vs_ref"] = round(results[ref][k] / r[k], 2)
        summary["runs"][c] = row
    print(f"{'weights GB/token':<24}" + "".join(f"{summary['runs'][c]['bytes_per_token'] / 1e9:>16.2f}" for c in cols))
    for k in ("decode_limit_tok_s", "pct_of_bandwidth_limit", "prefill_GFLOPs", "pct_of_gemm_peak"):
        print(f"{k:<24}" + "".join(f"{summary['runs'][c][k]:>16}" for c in cols))
    if ref:
        for k in ("decode_b1_tok_s_vs_ref", "decode_b8_tok_s_vs_ref", "prefill_image_64_s_vs_ref", "ttft_s_vs_ref",
                  "vision_448_s_vs_ref"):
            print(f"{k:<24}" + "".join(f"{summary['runs'][c].get(k, '-'):>16}" for c in cols))
    return summary


def main(argv: list[str] | None = None, load_reference=None) -> int:
    """``load_reference(path, dtype) -> model``: given by bench/reference_worker.py only."""
    ap = argparse.ArgumentParser(prog="qwen3vl bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="2B", choices=["tiny", *ARCH_DIRS])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="dtype of the checkpoint and of the reference run")
    ap.add_argument("--formats", default=None,
                    help="comma-separated formats for qwen3vl: float32,bfloat16,int8,int4 (default: --dtype)")
    ap.add_argument("--quantization", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--worker", choices=["ours", "ref"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.dtype, args.threads, args.new_tokens, args.context,
                                args.quantization, load_reference)))
        return 0
    if not args.skip_reference:
        if not os.path.isfile(REFERENCE_WORKER):
            ap.error(f"the reference side of the comparison runs from a source checkout ({REFERENCE_WORKER} "
                     "not found); pass --skip-reference")
        if importlib.util.find_spec("transformers") is None:
            ap.error("the reference side of the comparison needs transformers (pip install 'qwen3vl[test]'); "
                     "or pass --skip-reference")
    path = checkpoint(args.arch, args.dtype)
    formats = (args.formats or args.dtype).split(",")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        ap.error(f"unknown format(s) {bad}; choose from {list(FORMATS)}")
    # Workers first: a child inherits the parent's peak RSS, and the limits test allocates 1 GiB.
    results = {f"ours:{f}": run_worker_subprocess("ours", args, path, f) for f in formats}
    if not args.skip_reference:
        results[f"ref:{args.dtype}"] = run_worker_subprocess("ref", args, path, args.dtype)
    limits = machine_limits(args.threads)
    summary = report(args, limits, results, path)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
