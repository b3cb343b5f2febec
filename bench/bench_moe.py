"""MoE decode speed at batch 1: ours (bf16, int8, int4) vs the reference (bf16), same weights, one run.

The checkpoint is random, in the released layout, bf16, shaped like Qwen3-VL-30B-A3B at full
width (hidden 2048, 128 experts, moe_intermediate 768, top-8, 32/4 heads of 128, vocab 151936)
but with fewer decoder layers (default 8; the real model has 48) and a vision tower shrunk to
depth 2 (text-only prompts never run it; it only costs load time). It is written once to
$QWEN3VL_HOME/bench-moe-L{layers} (default ~/.cache/qwen3vl) and reused.

Decode rate = (N - 1) / (t(N) - t(1)), with t(n) the median wall time of each
implementation's own ``generate`` for n new greedy tokens after a 64-token prompt (min_new_tokens
= n, so an end token cannot stop it early). The physical limit is one read of the bytes a token
touches in that format (k experts x 3 matrices per sparse layer, attention, router, lm_head) at
the memory bandwidth measured here. The MoE blocks are also timed alone (one token through every
layer's block, same inputs for both), the part of decode this block owns.

Our int8/int4 rows quantize the same bf16 checkpoint at load (``qwen3vl.quant``: experts in that
format, attention and lm_head int8, router bf16); their speed-up over the reference is partly
the smaller format, so the table gives each format's bytes per token and share of its own limit.
At 4 layers the lm_head (622 MB in bf16) is over half of the bf16 bytes a token reads, at 8 layers
41 %, in the real 48-layer model 10 %: more layers weigh the MoE layers more.

Prints a table, then ONE JSON line. Run alone: timings on a busy machine are meaningless.
Usage: python bench/bench_moe.py [--layers 8] [--formats bf16,int8,int4] [--prompt 64] [--new 32]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import qwen3vl  # noqa: E402
from qwen3vl import env  # noqa: E402
from qwen3vl.random_checkpoint import write_random_checkpoint  # noqa: E402


def bench_config(layers: int, vision_depth: int = 2) -> dict:
    """Qwen3-VL-30B-A3B-Instruct's config.json with fewer layers (released dialect)."""
    text = {
        "model_type": "qwen3_vl_moe_text", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "dtype": "bfloat16",
    }
    vision = {
        "model_type": "qwen3_vl_moe", "depth": vision_depth, "hidden_size": 1152, "intermediate_size": 4304,
        "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "out_hidden_size": 2048, "num_position_embeddings": 2304,
        "deepstack_visual_indexes": list(range(min(3, vision_depth))), "hidden_act": "gelu_pytorch_tanh",
    }
    return {"architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
            "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "tie_word_embeddings": False, "dtype": "bfloat16",
            "text_config": text, "vision_config": vision}


def ensure_checkpoint(layers: int) -> str:
    path = os.path.join(env.home(), f"bench-moe-L{layers}")
    done = os.path.join(path, ".complete")
    config = bench_config(layers)
    if os.path.isfile(done) and json.load(open(os.path.join(path, "config.json"))) == config:
        return path
    print(f"writing a random bf16 checkpoint to {path} (once) ...", flush=True)
    # Several shards keep the writer's peak memory near one copy of the weights.
    write_random_checkpoint(path, config, seed=0, dtype=torch.bfloat16, shards=2 + layers)
    open(done, "w").close()
    return path


def bytes_per_weight(fmt: str, in_features: int, group: int = 64) -> float:
    """Bytes read per weight in a format: bf16; int8 + one fp32 scale per row; int4 codes + bf16
    scale and zero per group (``qwen3vl.quant``)."""
    return {"bf16": 2.0, "int8": 1 + 4 / in_features, "int4": 0.5 + 4 / group}[fmt]


def bytes_per_token(cfg: dict, fmt: str = "bf16") -> dict:
    """Bytes of weights one decode token reads (norms and the embedding row are negligible)."""
    t = cfg["text_config"]
    h, i, k, e = t["hidden_size"], t["moe_intermediate_size"], t["num_experts_per_tok"], t["num_experts"]
    q, kv = t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    layers = t["num_hidden_layers"]
    experts = layers * k * (2 * i * h * bytes_per_weight(fmt, h) + h * i * bytes_per_weight(fmt, i))
    att = "bf16" if fmt == "bf16" else "int8"  # quantized models keep attention in int8 (qwen3vl.quant)
    attention = layers * ((q + 2 * kv) * h * bytes_per_weight(att, h) + h * q * bytes_per_weight(att, q))
    router = layers * e * h * 2
    lm_head = t["vocab_size"] * h * bytes_per_weight("bf16" if fmt == "bf16" else "int8", h)
    return {"experts": experts, "attention": attention, "router": router, "lm_head": lm_head,
            "total": experts + attention + router + lm_head}


def memory_bandwidth() -> float:
    """Read bandwidth in bytes/s: the best of a few float32 sums over 1 GiB (a bf16 sum is
    partly compute-bound here and would understate it)."""
    big = torch.ones(2**28, dtype=torch.float32)
    big.sum()
    best = min(_timed(big.sum) for _ in range(5))
    return big.numel() * 4 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_rate(gen, new: int, repeats: int) -> dict:
    """gen(n) -> ids. Median t(1) and t(N); decode rate excludes the prefill."""
    gen(2)  # warm-up: first-call allocations, kernel selection
    t1 = statistics.median(_timed(lambda: gen(1)) for _ in range(repeats))
    tn = statistics.median(_timed(lambda: gen(new)) for _ in range(repeats))
    return {"t1_s": t1, "tN_s": tn, "decode_tok_s": (new - 1) / (tn - t1)}


def block_ms(blocks: list, hidden: torch.Tensor) -> float:
    """Median ms per token of the MoE blocks alone (all layers), one token at a time.
    hidden: (n, 1, 1, H) inputs, different tokens so different experts are read each time."""
    def once():
        for x in hidden:
            for blk in blocks:
                blk(x)

    with torch.inference_mode():
        once()
        return statistics.median(_timed(once) for _ in range(3)) / hidden.shape[0] * 1e3


def block_inputs(hidden_size: int, n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 1, hidden_size, generator=g).to(torch.bfloat16)  # (n, 1, 1, H)


def prompt(length: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (1, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run_ours(path: str, inputs: dict, new: int, repeats: int, fmt: str) -> tuple[dict, torch.Tensor]:
    t0 = time.perf_counter()
    model = qwen3vl.Qwen3VL.from_pretrained(path, dtype=torch.bfloat16, progress=False,
                                            quantization=None if fmt == "bf16" else fmt)
    load_s = time.perf_counter() - t0

    def gen(n):
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    res = decode_rate(gen, new, repeats)
    res["load_s"] = load_s
    res["moe_block_ms"] = block_ms([layer.mlp for layer in model.model.language_model.layers],
                                   block_inputs(model.config.text.hidden_size))
    return res, gen(new)


def run_reference(path: str, inputs: dict, new: int, repeats: int) -> tuple[dict, torch.Tensor]:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    mm = torch.zeros_like(inputs["input_ids"], dtype=torch.int)  # text only: no image/video tokens

    @torch.no_grad()
    def gen(n):
        return model.generate(**inputs, mm_token_type_ids=mm, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    res = decode_rate(gen, new, repeats)
    res["moe_block_ms"] = block_ms([layer.mlp for layer in model.model.language_model.layers],
                                   block_inputs(model.config.text_config.hidden_size))
    return res, gen(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--formats", default="bf16,int8,int4", help="our weight formats, comma separated")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("bf16", "int8", "int4")]
    if bad:
        ap.error(f"unknown format(s) {bad}; choose from bf16, int8, int4")
    torch.set_num_threads(args.threads)
    path = ensure_checkpoint(args.layers)
    cfg = json.load(open(os.path.join(path, "config.json")))
    inputs = prompt(args.prompt)
    load = os.getloadavg()[0]
    bw = memory_bandwidth()
    # One model in memory at a time: the bf16 ones are ~11 GB at 8 layers.
    ours, ours_ids = {}, {}
    for fmt in formats:
        ours[fmt], ours_ids[fmt] = run_ours(path, inputs, args.new, args.repeats, fmt)
        gc.collect()
    ref, ref_ids = run_reference(path, inputs, args.new, args.repeats)
    t = args.prompt
    same = {f: int((ids[0, t:] == ref_ids[0, t:]).cumprod(0).sum()) for f, ids in ours_ids.items()}
    report(args, cfg, bw, load, ours, ref, same)


def report(args, cfg: dict, bw: float, load: float, ours: dict, ref: dict, same: dict) -> None:
    t = cfg["text_config"]
    ref_b = bytes_per_token(cfg)
    print(f"\nMoE decode, batch 1: {t['num_hidden_layers']} layers x {t['num_experts']} experts "
          f"(top-{t['num_experts_per_tok']}, H {t['hidden_size']}, I {t['moe_intermediate_size']}), "
          f"{args.threads} threads, prompt {args.prompt}, {args.new} new tokens; {bw / 1e9:.1f} GB/s measured; "
          f"load avg {load:.2f}")
    print(f"{'':18s}{'load s':>8s}{'decode tok/s':>14s}{'x ref':>7s}{'MB/token':>10s}{'experts MB':>11s}"
          f"{'limit tok/s':>12s}{'% limit':>8s}{'MoE ms':>8s}{'same greedy':>12s}")
    rows = {}
    for name, r in [(f"qwen3vl {f}", ours[f]) for f in ours] + [("reference bf16", ref)]:
        fmt = name.split()[-1]
        b = bytes_per_token(cfg, fmt)
        limit = bw / b["total"]
        rows[name] = dict(tok_s=r["decode_tok_s"], ratio=r["decode_tok_s"] / ref["decode_tok_s"],
                          mb=b["total"] / 1e6, experts_mb=b["experts"] / 1e6, limit=limit,
                          pct=100 * r["decode_tok_s"] / limit, moe_ms=r["moe_block_ms"])
        w = rows[name]
        greedy = f"{same[fmt]}/{args.new}" if name.startswith("qwen3vl") else ""
        print(f"{name:18s}{r.get('load_s', float('nan')):8.1f}{w['tok_s']:14.2f}{w['ratio']:7.2f}{w['mb']:10.0f}"
              f"{w['experts_mb']:11.0f}{limit:12.2f}{w['pct']:8.0f}{w['moe_ms']:8.2f}{greedy:>12s}")
    print(f"bf16 bytes/token: experts {ref_b['experts'] / 1e6:.0f} MB ({t['num_experts_per_tok']} x 3 x H x I per "
          f"sparse layer), attention {ref_b['attention'] / 1e6:.0f} MB, router {ref_b['router'] / 1e6:.1f} MB, "
          f"lm_head {ref_b['lm_head'] / 1e6:.0f} MB (int8 / int4: attention and lm_head int8, router bf16)")
    print("same greedy: leading greedy tokens equal to the reference's (quantized formats are expected to drift)")
    print(json.dumps({
        "bench": "moe_decode", "layers": t["num_hidden_layers"], "experts": t["num_experts"],
        "top_k": t["num_experts_per_tok"], "threads": args.threads, "load_avg": round(load, 2),
        "bandwidth_gb_s": round(bw / 1e9, 2), "ref_tok_s": round(ref["decode_tok_s"], 3),
        "ref_moe_block_ms": round(ref["moe_block_ms"], 3), "ref_prefill_s": round(ref["t1_s"], 4),
        "ours": {f: {"tok_s": round(rows[f"qwen3vl {f}"]["tok_s"], 3), "ratio": round(rows[f"qwen3vl {f}"]["ratio"], 3),
                     "limit_tok_s": round(rows[f"qwen3vl {f}"]["limit"], 3),
                     "bytes_per_token": round(rows[f"qwen3vl {f}"]["mb"] * 1e6),
                     "expert_bytes_per_token": round(rows[f"qwen3vl {f}"]["experts_mb"] * 1e6),
                     "moe_block_ms": round(ours[f]["moe_block_ms"], 3), "load_s": round(ours[f]["load_s"], 2),
                     "prefill_s": round(ours[f]["t1_s"], 4), "same_greedy_prefix": same[f]} for f in ours}}))


if __name__ == "__main__":
    main()
