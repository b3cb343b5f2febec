"""The paper plan of tensor parallelism (issue 22): bytes per rank and expected decode tok/s
for the released configs at TP 2/4/8, on CPU hosts and on H100/H200 GPUs. Nothing is loaded:
each rank's model is built on the meta device with the real sharding (``qwen3vl.parallel``) and
quantization (``qwen3vl.quant``) applied, and its tensors are counted.

Decode step time at batch 1 (a lower bound, memory- and latency-bound):
  bytes one token reads on the busiest rank / memory bandwidth
  + 2 all-reduces per layer + the logits gather, each latency + 2(N-1)/N x bytes / link bandwidth
  (latency: CPU hosts a gloo/TCP ring, 2(N-1) hops of 50 us; GPUs in one NVSwitch node ~8 us per
  small NCCL all-reduce, whatever N).
Bytes a token reads per rank: its attention, dense MLP, router and lm_head shards, the norms, and
for MoE the k routed experts (on average k/N of them per rank under expert parallel, k slices of
1/N under the tensor split: the same bytes; expert parallel adds load imbalance, not counted).
All-reduce payload: hidden x 4 bytes (fp32 accumulation, as on gloo; NCCL in bf16 halves it).

Hardware figures (assumptions, stated so they can be replaced): CPU host 150 GB/s effective
memory bandwidth (one modern server socket), hosts joined by 100 Gb/s Ethernet (12.5 GB/s,
50 us per gloo/TCP hop); H100 SXM 2.6 TB/s effective HBM (80 % of 3.35), H200 3.8 TB/s (80 % of
4.8), NVLink 4 450 GB/s per direction. Batch 1, no overlap of communication and compute.

Usage: python bench/tp_plan.py [--configs DIR] (default: qwen3vl/assets/configs) -> a table and ONE JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qwen3vl import quant  # noqa: E402
from qwen3vl.bench import ARCH_CONFIGS  # noqa: E402
from qwen3vl.config import Qwen3VLConfig  # noqa: E402
from qwen3vl.model.qwen3vl import Qwen3VLModel  # noqa: E402
from qwen3vl.parallel.load import shard_model  # noqa: E402
from qwen3vl.parallel.shard import ShardPlan  # noqa: E402

HARDWARE = {  # name: (memory GB/s, link GB/s, latency s, latency per ring hop?, memory per device GB)
    "CPU hosts": (150, 12.5, 50e-6, True, 512),
    "H100": (2600, 450, 8e-6, False, 80),
    "H200": (3800, 450, 8e-6, False, 141),
}
MODELS = ("Qwen3-VL-2B-Instruct", "Qwen3-VL-30B-A3B-Instruct", "Qwen3-VL-32B-Instruct", "Qwen3-VL-235B-A22B-Instruct")


def rank_bytes(cfg: Qwen3VLConfig, world: int, fmt: str, rank: int) -> tuple[float, float]:
    """(bytes this rank holds, bytes one decoded token reads on it)."""
    with torch.device("meta"):
        model = Qwen3VLModel(cfg).to(torch.bfloat16)
    if fmt != "bf16":
        quant.quantize_modules(model, fmt, 128 if fmt == "int4" else 64)
    if world > 1:
        shard_model(model, ShardPlan(rank, world, expert_parallel=cfg.text.num_experts > 0))
    held = read = 0.0
    k, e = cfg.text.num_experts_per_tok, cfg.text.num_experts
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if rank > 0 and (name.startswith("model.visual.") or ".embed_tokens." in name):
            continue  # other ranks hold neither (rank 0 broadcasts embeddings)
        n = t.numel() * t.element_size()
        held += n
        if name.startswith("model.visual."):
            continue
        if ".embed_tokens." in name:
            read += n / cfg.text.vocab_size  # one row per token
        elif (".mlp.gate_up_proj" in name or ".mlp.down_proj" in name) and t.dim() == 3:
            read += n * k / e  # expert stacks: a token reads k of the E experts (on average k/E of each rank's)
        else:
            read += n
    return held, read


def step_seconds(cfg: Qwen3VLConfig, world: int, read: float, hw: tuple) -> float:
    mem, link, latency, per_hop, _ = hw
    t = read / (mem * 1e9)
    if world > 1:
        h, layers, v = cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.text.vocab_size
        lat = 2 * (world - 1) * latency if per_hop else latency
        ring = lambda size: lat + 2 * (world - 1) / world * size / (link * 1e9)  # noqa: E731
        t += 2 * layers * ring(4 * h) + ring(4 * v / world)
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=ARCH_CONFIGS)
    args = ap.parse_args()
    rows = []
    for name in MODELS:
        cfg = Qwen3VLConfig.from_pretrained(os.path.join(args.configs, name))
        for fmt in ("bf16", "int4"):
            for world in (1, 2, 4, 8):
                held0, read0 = rank_bytes(cfg, world, fmt, 0)
                held1, read1 = rank_bytes(cfg, world, fmt, 1) if world > 1 else (held0, read0)
                read = max(read0, read1)
                tok_s = {hw: 1 / step_seconds(cfg, world, read, spec) for hw, spec in HARDWARE.items()}
                fits = {hw: held0 / 1e9 < 0.9 * spec[4] for hw, spec in HARDWARE.items()}
                rows.append({"model": name, "format": fmt, "tp": world, "rank0_gb": held0 / 1e9,
                             "rank1_gb": held1 / 1e9, "read_gb_per_token": read / 1e9, "tok_s": tok_s, "fits": fits})
    print(f"{'model':<28} {'fmt':<5} {'TP':>2} {'rank0 GB':>9} {'rank>0 GB':>9} {'GB/token':>8}  "
          + "  ".join(f"{hw + ' tok/s':>15}" for hw in HARDWARE))
    for r in rows:
        cells = "  ".join(f"{r['tok_s'][hw]:>14.1f}{'' if r['fits'][hw] else '*'}" for hw in HARDWARE)
        print(f"{r['model']:<28} {r['format']:<5} {r['tp']:>2} {r['rank0_gb']:>9.1f} {r['rank1_gb']:>9.1f} "
              f"{r['read_gb_per_token']:>8.2f}  {cells}")
    print("* does not fit in one device's memory at that size (weights alone over 90 %)")
    print(json.dumps({"bench": "tp_plan", "hardware": HARDWARE, "rows": rows}))


if __name__ == "__main__":
    main()
