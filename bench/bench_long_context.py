"""Long context on the CPU: peak memory and prefill / decode speed against context length, ours and
the reference (transformers), each point in a fresh subprocess.

Model: the 2B architecture's widths (hidden 2048, 16 query / 8 KV heads of 128, MLP 6144, vocab
151936, tied embeddings) with random weights, ``--layers`` decoder layers (default 1: time and
activation memory per layer are the same in every layer, all 28 would take ~28x as long on 2
cores; KV bytes scale with the depth and are given for 28) and a one-block vision tower (text-only
prompts never run it). A point = one greedy ``generate`` of ``--new-tokens`` tokens after a random
text prompt of N tokens. Reported per point: prefill tokens/s (prompt / time to first token),
decode tokens/s (tokens 2..n), RSS after loading and a 16-token warm-up, and the extra peak RSS of
the generate call (activations + KV cache; the peak counter is reset before it). KV-cache bytes per
token per format are computed from the shapes (ours preallocates the cache for prompt + new
tokens; the reference's grows by concatenation).

    python bench/bench_long_context.py                      # 1K..16K, 1 layer, bf16: ~6 min
    python bench/bench_long_context.py --contexts 1024 2048 4096 8192 16384 32768   # + 32K: ~+10 min
    python bench/bench_long_context.py --layers 28 --contexts 1024 4096            # full depth
    python bench/bench_long_context.py --contexts 256 512 --skip-reference   # smoke run

Prints a table, then ONE JSON line; writes a PNG plot (``--plot``; needs the ``bench`` extra,
matplotlib). Run it alone: on a busy 2-core machine the timings are meaningless.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qwen3vl import Qwen3VL, env  # noqa: E402
from qwen3vl.bench import _Clock, arch_config  # noqa: E402
from qwen3vl.random_checkpoint import write_random_checkpoint  # noqa: E402

CONTEXTS = (1024, 2048, 4096, 8192, 16384)  # 32768 with --contexts: ~10 more minutes (2 cores)
KV_FORMATS = {"float32": 4, "bfloat16": 2, "float16": 2}  # KV-cache element bytes per format
GiB = 2**30


# ---------------------------------------------------------------------- model and sizes
def bench_config(layers: int, dtype: str) -> dict:
    cfg = json.loads(json.dumps(arch_config("2B")))
    cfg["text_config"]["num_hidden_layers"] = layers
    cfg["vision_config"].update(depth=1, deepstack_visual_indexes=[0])
    cfg["torch_dtype"] = dtype
    return cfg


def checkpoint(layers: int, dtype: str) -> str:
    path = os.path.join(env.home(), f"bench-long-2B-{layers}L-{dtype}")
    if not os.path.isfile(os.path.join(path, "DONE")):
        print(f"writing random 2B-width checkpoint, {layers} layers ({dtype}) to {path} ...", file=sys.stderr)
        write_random_checkpoint(path, bench_config(layers, dtype), seed=0, dtype=getattr(torch, dtype))
        open(os.path.join(path, "DONE"), "w").close()
    return path


def kv_bytes_per_token(text_cfg: dict, element_bytes: int, layers: int | None = None) -> int:
    """Keys and values of one token in every layer: 2 x layers x KV heads x head_dim x bytes."""
    layers = text_cfg["num_hidden_layers"] if layers is None else layers
    return 2 * layers * text_cfg["num_key_value_heads"] * text_cfg["head_dim"] * element_bytes


# ---------------------------------------------------------------------- one point (subprocess)
def _rss() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in bytes, from /proc (ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass




def _load(impl: str, path: str, dtype: str):
    if impl == "ours":
        return Qwen3VL.from_pretrained(path, dtype=getattr(torch, dtype), progress=False)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from processor_fixtures import import_torchvision

    import_torchvision()  # test-only torchvision needs its op stub before transformers imports it
    import transformers

    return transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def worker(impl: str, path: str, dtype: str, context: int, new_tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = _load(impl, path, dtype)

    def generate(n: int, clock=None) -> torch.Tensor:
        ids = torch.randint(0, 150000, (1, n), generator=torch.Generator().manual_seed(n))
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if impl == "ref":
            kw["mm_token_type_ids"] = torch.zeros_like(ids)
        with torch.inference_mode():
            return model.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  streamer=clock)

    generate(16)  # warm-up: every weight paged in (memory-mapped loads), kernels and pools ready
    clock = _Clock()
    loaded, _ = _rss()
    _reset_peak()
    t0 = time.perf_counter()
    out = generate(context, clock)
    _, peak = _rss()
    assert out.shape[1] == context + new_tokens and len(clock.times) == new_tokens + 1
    steps = clock.times[1:]  # one per new token
    return {"prefill_tok_s": context / (steps[0] - t0),
            "decode_tok_s": (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else None,
            "rss_loaded_GiB": loaded / GiB, "peak_extra_GiB": (peak - loaded) / GiB}


def run_point(impl: str, args, path: str, context: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--ckpt", path, "--dtype", args.dtype,
           "--context", str(context), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- report
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict, contexts, impls) -> str:
    head = f"{'context':>8} {'impl':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'RSS loaded GiB':>15} " \
           f"{'peak extra GiB':>15}"
    lines = [head, "-" * len(head)]
    for t in contexts:
        for impl in impls:
            r = results[impl][str(t)]
            if "error" in r:
                lines.append(f"{t:>8} {impl:>5}  failed: {r['error']}")
                continue
            lines.append(f"{t:>8} {impl:>5} {_fmt(r['prefill_tok_s'], '14.1f')} {_fmt(r['decode_tok_s'], '13.2f')} "
                         f"{r['rss_loaded_GiB']:15.2f} {r['peak_extra_GiB']:15.2f}")
    return "\n".join(lines)


def kv_table(text_cfg: dict, layers: int, contexts) -> tuple[str, dict]:
    """KV-cache bytes per token per format, for the benchmarked depth and the full 2B (28 layers)."""
    full = text_cfg["num_hidden_layers"]
    sizes = {fmt: {"bench": kv_bytes_per_token(text_cfg, b, layers), "2B": kv_bytes_per_token(text_cfg, b, full)}
             for fmt, b in KV_FORMATS.items()}
    lines = [f"KV cache per token (2 x layers x {text_cfg['num_key_value_heads']} KV heads x "
             f"{text_cfg['head_dim']} x bytes):"]
    for fmt, s in sizes.items():
        lines.append(f"  {fmt:9} {s['bench']:>9,} B ({layers} layers)   {s['2B']:>9,} B (2B, {full} layers) = "
                     f"{s['2B'] * max(contexts) / GiB:.2f} GiB at {max(contexts):,} tokens")
    return "\n".join(lines), sizes


def plot(results: dict, contexts, impls, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("peak_extra_GiB", "extra peak RSS of generate (GiB)"), ("prefill_tok_s", "prefill tokens/s"),
              ("decode_tok_s", "decode tokens/s"))
    for ax, (key, title) in zip(axes, panels):
        for impl in impls:
            pts = [(t, results[impl][str(t)].get(key)) for t in contexts]
            pts = [(t, v) for t, v in pts if v is not None]
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label={"ours": "qwen3vl", "ref": "reference"}[impl])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    p.add_argument("--layers", type=int, default=1, help="decoder layers of the 2B-width model (2B has 28)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--plot", default="bench_long_context.png", help="PNG output ('' to skip)")
    p.add_argument("--worker", choices=["ours", "ref"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--context", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.dtype, args.context, args.new_tokens, args.threads)))
        return 0
    path = checkpoint(args.layers, args.dtype)
    impls = ["ours"] if args.skip_reference else ["ours", "ref"]
    results = {impl: {} for impl in impls}
    for t in args.contexts:
        for impl in impls:
            print(f"  {impl} {t} tokens ...", file=sys.stderr, flush=True)
            results[impl][str(t)] = run_point(impl, args, path, t)
    text_cfg = bench_config(28, args.dtype)["text_config"]
    kv_text, kv = kv_table(text_cfg, args.layers, args.contexts)
    print(f"2B widths, {args.layers} decoder layers, {args.dtype}, {args.threads} threads, "
          f"{args.new_tokens} new tokens, batch 1")
    print(table(results, args.contexts, impls))
    print(kv_text)
    if args.plot:
        plot(results, args.contexts, impls, args.plot)
        print(f"plot: {args.plot}")
    print(json.dumps({"bench": "long_context", "layers": args.layers, "dtype": args.dtype, "threads": args.threads,
                      "new_tokens": args.new_tokens, "kv_bytes_per_token": kv, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
