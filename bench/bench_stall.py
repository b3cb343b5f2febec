"""Does a long video prompt freeze running streams? Chunked prefill, measured.

One request (A) streams tokens; once it is under way a second request (B) arrives whose prompt is
a ~4,000-token video. Per setting of ``max_num_batched_tokens`` it reports A's largest gap between
two tokens while B is encoded and prefilled, B's time to first token, and how many steps B's
prefill took. "one piece" is the engine without chunking (a budget larger than the prompt): B's
whole encoding and prefill run between two of A's tokens. In-process engine (no HTTP), greedy.
The checkpoint is the tiny demo (default) or the 2B architecture with random weights
(``--arch 2B``). Prints a table, then ONE JSON line. Run alone: timings on a busy machine are
meaningless. Usage:
    python bench/bench_stall.py [--arch demo|2B] [--dtype bfloat16] [--budgets 512 128]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qwen3vl import LLM  # noqa: E402
from qwen3vl.bench import checkpoint, with_tokenizer  # noqa: E402
from qwen3vl.engine.engine import Engine  # noqa: E402

VIDEO_FPS = 2
MODEL_INPUTS = ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def write_video(path: str, frames: int, size: int) -> str:
    """A clip of ``frames`` moving-noise frames at 2 fps (every frame sampled)."""
    import av

    rng = np.random.default_rng(0)
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def prompts(llm: LLM, video: str) -> tuple[dict, dict]:
    def encode(*content) -> dict:
        parts = [{"type": "text", "text": c} if isinstance(c, str) else c for c in content]
        out = llm.processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True, return_tensors="pt",
                                                fps=VIDEO_FPS, max_frames=64)
        return {k: v for k, v in out.items() if k in MODEL_INPUTS}

    return encode("Write a long story about a lighthouse."), encode({"type": "video", "video": video},
                                                                    "What happens in this video?")


def measure(llm: LLM, budget: int, a_inputs: dict, b_inputs: dict, a_tokens: int) -> dict:
    """A streams; after its 4th token B arrives -> A's largest gap during B's prefill, B's TTFT."""
    engine = Engine(llm.model, llm.processor, 2, max_model_len=8192, max_num_batched_tokens=budget,
                    enable_prefix_caching=False)
    params = llm.sampling_params(max_tokens=a_tokens, min_new_tokens=a_tokens, temperature=0)
    a = engine.submit(engine.new_request(a_inputs, params))
    b = engine.new_request(b_inputs, llm.sampling_params(max_tokens=1, temperature=0))
    a_times, steps, b_sent, b_first = [], 0, None, None
    while b.result is None or b_sent is None:
        events = engine.step()
        now = time.perf_counter()
        a_times += [now for r, d in events if r is a and d.token_ids]
        if b_sent is not None:
            steps += 1
            if b_first is None and any(r is b for r, _ in events):
                b_first = now
        if b_sent is None and len(a_times) == 4:
            engine.submit(b)
            b_sent = time.perf_counter()
        if a.result is not None and b.result is None and b_sent is not None:
            raise SystemExit(f"A finished before B's prefill did: raise its tokens (now {a_tokens})")
    engine.cancel(a)
    engine.step()
    during = [t for t in a_times if t >= b_sent] + [b_first]
    gaps = np.diff([max(t for t in a_times if t < b_sent)] + during)
    return {"budget": budget, "a_max_gap_s": float(gaps.max()), "b_ttft_s": b_first - b_sent, "b_steps": steps,
            "a_tokens_during": len(during) - 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="demo", help="demo (the tiny built-in checkpoint) or 2B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--budgets", type=int, nargs="+", default=[512, 128])
    p.add_argument("--frames", type=int, default=40, help="video frames (2 per temporal patch)")
    p.add_argument("--size", type=int, default=448, help="video side in pixels (448: 196 tokens per 2 frames)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = None if args.arch == "demo" else with_tokenizer(checkpoint(args.arch, args.dtype))
    llm = LLM(path, dtype=args.dtype if path else "auto", max_model_len=8192, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        a_inputs, b_inputs = prompts(llm, write_video(os.path.join(tmp, "clip.mp4"), args.frames, args.size))
    n = b_inputs["input_ids"].shape[1]
    rows = []
    for budget in [n + 1] + args.budgets:
        rows.append(measure(llm, budget, a_inputs, b_inputs, a_tokens=4000))
        rows[-1]["setting"] = "one piece" if budget > n else f"chunks of {budget}"
    print(f"\nstall of a running stream while a {n}-token video prompt is prefilled ({args.arch}, {llm.model.dtype}, "
          f"{args.threads} threads)")
    print(f"{'setting':>16} {'A max gap s':>12} {'A tokens meanwhile':>19} {'B TTFT s':>9} {'B steps':>8}")
    for r in rows:
        print(f"{r['setting']:>16} {r['a_max_gap_s']:12.3f} {r['a_tokens_during']:19d} {r['b_ttft_s']:9.2f} "
              f"{r['b_steps']:8d}")
    print(json.dumps({"bench": "stall", "arch": args.arch, "dtype": str(llm.model.dtype), "prompt_tokens": n,
                      "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
