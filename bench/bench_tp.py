"""Tensor-parallel decode on one host: TP 1 with T threads vs TP N with T/N threads per rank.

The checkpoint is random, in the released layout, bf16, with the real text decoder of the chosen
shape (``--shape 2B``: the released config in qwen3vl/assets/configs, or
``--config PATH``) and a vision tower shrunk to depth 2 (text prompts never run it); ``--layers``
shortens the decoder. Written once to $QWEN3VL_HOME/bench-tp-<shape>-L<layers> and reused.
``--shape tiny`` is the demo's tiny architecture (smoke runs).

Each configuration runs in its own process (its peak RSS is its own): decode rate =
(N - 1) / (t(N) - t(1)), t(n) the median wall time of ``LLM.chat`` for n greedy tokens after a
``--prompt``-token prompt (min_new_tokens = n). Communication per step: rank 0's seconds inside
all-reduces, the logits gather and the step's broadcast (``qwen3vl.parallel.comm.STATS``;
waiting for a slower rank counts there too), divided by the decode steps. Peak RSS per rank:
rank 0's ``ru_maxrss``, the others' ``VmHWM``.

Prints a table, then ONE JSON line. Run alone: timings on a busy machine are meaningless.
Usage: python bench/bench_tp.py [--shape 2B] [--layers 28] [--sizes 1,2] [--threads 2] [--new 16]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import qwen3vl  # noqa: E402
from qwen3vl import env  # noqa: E402
from qwen3vl.bench import ARCH_CONFIGS  # noqa: E402
from qwen3vl.demo import demo_checkpoint  # noqa: E402
from qwen3vl.parallel import comm  # noqa: E402
from qwen3vl.random_checkpoint import TINY_CONFIG, write_random_checkpoint  # noqa: E402

def checkpoint(shape: str, config: str | None, layers: int | None) -> str:
    if shape == "tiny" and config is None:
        cfg = copy.deepcopy(TINY_CONFIG)
    else:
        with open(config or os.path.join(ARCH_CONFIGS, f"Qwen3-VL-{shape}-Instruct", "config.json")) as f:
            cfg = json.load(f)
        cfg["vision_config"].update(depth=2, deepstack_visual_indexes=[0, 1])
    if layers:
        cfg["text_config"]["num_hidden_layers"] = layers
    n = cfg["text_config"]["num_hidden_layers"]
    path = os.path.join(env.home(), f"bench-tp-{shape}-L{n}")
    if not os.path.isfile(os.path.join(path, "DONE")):
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(demo_checkpoint(), path)
        for f in os.listdir(path):
            if f.endswith(".safetensors"):
                os.remove(os.path.join(path, f))
        write_random_checkpoint(path, cfg, seed=0, dtype=torch.bfloat16)
        open(os.path.join(path, "DONE"), "w").close()
    return path


def hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def one(args) -> dict:
    """This process: one configuration (``--one SIZE``) -> its figures."""
    size = args.one
    threads = max(1, args.threads // size)
    os.environ["QWEN3VL_TP_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    llm = qwen3vl.LLM(args.path, dtype="bfloat16", max_num_seqs=1, tensor_parallel_size=size,
                      enable_prefix_caching=False)
    ids = list(range(1000, 1000 + args.prompt))
    prompt = llm.processor.tokenizer.decode(ids)
    params = lambda n: llm.sampling_params(max_tokens=n, min_new_tokens=n, temperature=0)  # noqa: E731

    def timed(n: int) -> tuple[float, float]:
        c0, t0 = comm.STATS["seconds"], time.perf_counter()
        req = llm.prompt_request(prompt, params(n))
        llm.engine.submit(req)
        llm.engine.run_until_done([req])
        return time.perf_counter() - t0, comm.STATS["seconds"] - c0

    timed(2)
    t1 = [timed(1) for _ in range(args.repeat)]
    tn = [timed(args.new) for _ in range(args.repeat)]
    steps = args.new - 1
    dt = statistics.median(t for t, _ in tn) - statistics.median(t for t, _ in t1)
    comm_s = (statistics.median(c for _, c in tn) - statistics.median(c for _, c in t1)) / steps
    rss = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss] + [hwm_kb(p.pid) for p in
                                                                   (llm.parallel.procs if llm.parallel else [])]
    llm.shutdown()
    return {"tp": size, "threads_per_rank": threads, "decode_tok_s": steps / dt, "ms_per_step": 1e3 * dt / steps,
            "comm_ms_per_step": 1e3 * comm_s, "peak_rss_mb": [round(k / 1024) for k in rss]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="2B")
    ap.add_argument("--config", default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--sizes", default="1,2")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--one", type=int, default=None)
    ap.add_argument("--path", default=None)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args)))
        return
    path = checkpoint(args.shape, args.config, args.layers)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--one", str(size), "--path", path, "--threads", str(args.threads),
               "--prompt", str(args.prompt), "--new", str(args.new), "--repeat", str(args.repeat)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'TP':>3} {'threads/rank':>12} {'tok/s':>8} {'ms/step':>8} {'comm ms/step':>12}  peak RSS MB per rank")
    for r in rows:
        print(f"{r['tp']:>3} {r['threads_per_rank']:>12} {r['decode_tok_s']:>8.2f} {r['ms_per_step']:>8.1f} "
              f"{r['comm_ms_per_step']:>12.2f}  {r['peak_rss_mb']}")
    print(json.dumps({"bench": "tp", "shape": args.shape, "path": path, "rows": rows}))


if __name__ == "__main__":
    main()
