"""Loading an FP8 checkpoint: time and peak memory against loading the bf16 checkpoint it came from.

The bf16 random-weight checkpoint of ``--arch`` (``qwen3vl.bench.checkpoint``) is converted once
into an ``-FP8`` twin with the block-quantization formula (per 128x128 tile: scale = amax / 448,
e4m3 weights, bf16 ``weight_scale_inv``; the text decoder's projections, as the releases do; lm_head,
embeddings, routers and vision tower left in bf16), two shards with every scale in the other shard
than its weight. Then, per format (bf16, int8, int4) and source (bf16, FP8), a fresh process loads it
with the weight cache off (plain streaming: what this measures is the loader's own peak) and reports
``from_pretrained`` time, peak RSS (``VmHWM``) and the bytes of the loaded model: peak RSS minus
model bytes is the loader's transient overhead (Python + torch + one tensor + one fp32 tile), which
should not grow with FP8. Dense architectures only. Prints a table, then ONE JSON line. Run alone:
    python bench/bench_fp8_load.py [--arch 2B|tiny] [--formats bf16 int8 int4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

FORMATS = {"bf16": ("bfloat16", None), "int8": ("bfloat16", "int8"), "int4": ("bfloat16", "int4")}
SKIP = ["lm_head", "model.visual", "mlp.gate"]


def quantize_blocks(w):
    """(N, K) -> (e4m3 (N, K), bf16 scales (ceil(N/128), ceil(K/128))), one pass over padded tiles."""
    import torch

    n, k = w.shape
    pn, pk = -(-n // 128) * 128, -(-k // 128) * 128
    p = torch.zeros(pn, pk, dtype=torch.float32)
    p[:n, :k] = w
    t = p.view(pn // 128, 128, pk // 128, 128)
    s = (t.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448).bfloat16()
    q = (t / s.float()[:, None, :, None]).view(pn, pk)[:n, :k].to(torch.float8_e4m3fn)
    return q.contiguous(), s


def fp8_twin(src: str) -> str:
    """The -FP8 twin of bf16 checkpoint ``src`` (written once, next to it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qwen3vl.fp8 import excluded
    from qwen3vl.weights import checkpoint_files

    dst = src.rstrip("/") + "-FP8"
    if os.path.isfile(os.path.join(dst, "DONE")):
        return dst
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic", "modules_to_not_convert": SKIP}
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    shards, weight_map = ({}, {}), {}
    for fn in checkpoint_files(src):
        with safe_open(fn, "pt") as f:
            for i, name in enumerate(sorted(f.keys())):
                t = f.get_tensor(name)
                if (name.startswith("model.language_model.layers.") and name.endswith(".weight") and t.dim() == 2
                        and not excluded(name[: -len(".weight")], SKIP)):
                    q, s = quantize_blocks(t.float())
                    shards[i % 2][name], shards[1 - i % 2][name + "_scale_inv"] = q, s
                else:
                    shards[i % 2][name] = t
    for k, part in enumerate(shards):
        fn = f"model-0000{k + 1}-of-00002.safetensors"
        save_file(part, os.path.join(dst, fn), metadata={"format": "pt"})
        weight_map.update({n: fn for n in part})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    open(os.path.join(dst, "DONE"), "w").close()
    return dst


def child(path: str, fmt: str) -> dict:
    import torch

    from qwen3vl import Qwen3VL
    from qwen3vl.bench import peak_rss_gb

    dtype, quantization = FORMATS[fmt]
    t0 = time.perf_counter()
    model = Qwen3VL.from_pretrained(path, dtype=dtype, quantization=quantization, progress=False, weight_cache=False)
    load_s = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                 [*model.parameters(), *model.buffers()]}.values())
    with torch.inference_mode():
        model(input_ids=torch.tensor([list(range(1000, 1016))]))
    peak = peak_rss_gb() * 2**10
    return {"load_s": round(load_s, 2), "peak_rss_mib": round(peak), "model_mib": round(nbytes / 2**20),
            "overhead_mib": round(peak - nbytes / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="2B")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from qwen3vl.bench import checkpoint

    src = checkpoint(args.arch, "bfloat16")
    sources = {"bf16 ckpt": src, "FP8 ckpt": fp8_twin(src)}
    rows = []
    for fmt in args.formats:
        for label, path in sources.items():
            out = subprocess.run([sys.executable, __file__, "--child", path, fmt], check=True, capture_output=True,
                                 text=True, env={**os.environ, "QWEN3VL_NO_PROGRESS": "1"})
            rows.append({"format": fmt, "source": label, **json.loads(out.stdout.strip().splitlines()[-1])})
    print(f"{'format':6} {'source':10} {'load s':>7} {'peak RSS MiB':>13} {'model MiB':>10} {'overhead MiB':>13}")
    for r in rows:
        print(f"{r['format']:6} {r['source']:10} {r['load_s']:7.2f} {r['peak_rss_mib']:13d} {r['model_mib']:10d} "
              f"{r['overhead_mib']:13d}")
    print(json.dumps({"bench": "fp8_load", "arch": args.arch, "rows": rows}))


if __name__ == "__main__":
    main()
