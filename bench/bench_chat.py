"""A 10-turn chat over the HTTP server: what the prefix cache and the vision encoder cache save.

The conversation has two images (turns 1 and 4) and a short video (turn 7); every other turn is a
short text question, and each turn's prompt is the whole conversation so far (the previous
answers included). Per turn it reports the time to first token (first streamed content chunk)
and the tokens prefilled (prompt tokens minus the usage's ``prompt_tokens_details.cached_tokens``):

* ours, caches on (the default);
* ours, caches off (``serve --no-enable-prefix-caching``; the row is skipped, saying so, when the
  server has no such flag);
* the reference (transformers ``generate`` in this process, one new token), re-prefilling the
  whole conversation each turn from the same token ids and pixels (our processor's).

Both times include processing the conversation (decoding its media). The answers of the first
run are replayed as the history of the others, so every run sees the same prompts. The checkpoint is the 2B architecture with random weights (``qwen3vl.bench``; the
demo's tokenizer and template copied next to it), or ``--model PATH``. Prints a table, then ONE
JSON line. Run alone: timings on a busy machine are meaningless. Usage:
    python bench/bench_chat.py [--arch 2B] [--dtype bfloat16] [--tokens 32] [--skip-reference]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qwen3vl.bench import checkpoint, with_tokenizer  # noqa: E402
from qwen3vl.processor import Processor  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TURNS = [("image", "Describe this picture in detail."), (None, "Which colours dominate it?"),
         (None, "Is there anything unusual in it?"), ("image2", "Now describe this second picture."),
         (None, "Compare the two pictures."), (None, "Which of them is brighter?"),
         ("video", "What happens in this clip?"), (None, "How long does it last?"),
         (None, "Summarise everything we discussed."), (None, "Thanks. Any last remark?")]
VIDEO_FPS = 2


def media_uris(size: int) -> dict:
    """Two different noise images of one size (PNG) and a 2 s clip (MP4), as data: URIs."""
    import av
    from PIL import Image

    out = {}
    for name, seed in (("image", 1), ("image2", 2)):
        pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out[name] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 224
        stream.pix_fmt = "yuv420p"
        for i in range(8):
            frame = np.full((224, 224, 3), i * 30, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    out["video"] = "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()
    return out


def user_message(kind: str | None, text: str, uris: dict, openai: bool) -> dict:
    """One user turn, in the OpenAI format (``image_url`` / ``video_url`` parts) or our processor's."""
    parts = []
    if kind is not None:
        what = "video" if kind == "video" else "image"
        parts.append({"type": f"{what}_url", f"{what}_url": {"url": uris[kind]}} if openai
                     else {"type": what, what: uris[kind]})
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


# ---------------------------------------------------------------------------- our server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_flags() -> str:
    return subprocess.run([sys.executable, "-m", "qwen3vl.cli", "serve", "--help"], cwd=ROOT, capture_output=True,
                          text=True).stdout


def start_server(path: str, extra: list[str], log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "qwen3vl.cli", "serve", "--model", path, "--port", str(port),
           "--max-num-seqs", "2", "--max-model-len", "8192", "--limit-mm-per-prompt", '{"image": 2, "video": 1}',
           "--max-media-frames", "64", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not come up; see {log.name}")


def stream_turn(url: str, messages: list[dict], tokens: int) -> tuple[float, str, dict]:
    """One streamed greedy chat turn -> (seconds to the first content chunk, answer, usage)."""
    body = {"messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "mm_processor_kwargs": {"fps": VIDEO_FPS}}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0, ttft, text, usage = time.perf_counter(), None, "", {}
    with urllib.request.urlopen(req, timeout=3600) as resp:
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    ttft = time.perf_counter() - t0 if ttft is None else ttft
                    text += piece
            usage = chunk.get("usage") or usage
    return (time.perf_counter() - t0 if ttft is None else ttft), text, usage


def run_ours(path: str, extra: list[str], args, uris: dict, answers: list[str] | None) -> list[dict]:
    """The 10 turns against a fresh server -> per turn {ttft_s, prompt, prefilled, answer};
    ``answers``: replay these as the history instead of the server's own."""
    with tempfile.NamedTemporaryFile("w", prefix="bench-chat-", suffix=".log", delete=False) as log:
        proc, url = start_server(path, extra, log)
        try:
            messages, rows = [], []
            for i, (kind, text) in enumerate(TURNS):
                messages.append(user_message(kind, text, uris, openai=True))
                ttft, answer, usage = stream_turn(url, messages, args.tokens)
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                prompt = usage.get("prompt_tokens")
                rows.append({"ttft_s": ttft, "prompt": prompt, "answer": answer,
                             "prefilled": None if cached is None or prompt is None else prompt - cached})
                messages.append({"role": "assistant", "content": answer if answers is None else answers[i]})
            return rows
        finally:
            proc.terminate()
            proc.wait(30)


# ---------------------------------------------------------------------------- the reference
def run_reference(path: str, args, uris: dict, answers: list[str]) -> list[dict]:
    """transformers, re-prefilling the whole conversation each turn (time of one new token)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from processor_fixtures import import_torchvision

    import_torchvision()  # test-only torchvision needs its op stub before transformers imports it
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    processor = Processor.from_pretrained(path)
    image_pad, video_pad = processor.image_token_id, processor.video_token_id
    messages, rows = [], []
    for (kind, text), answer in zip(TURNS, answers):
        messages.append(user_message(kind, text, uris, openai=False))
        t0 = time.perf_counter()
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt", fps=VIDEO_FPS)
        ids = inputs["input_ids"]
        keep = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                "video_grid_thw")
        kw = {k: inputs[k] for k in keep if inputs.get(k) is not None}
        kw["mm_token_type_ids"] = (ids == image_pad).int() + 2 * (ids == video_pad).int()
        with torch.inference_mode():
            model.generate(**kw, max_new_tokens=1, do_sample=False)
        rows.append({"ttft_s": time.perf_counter() - t0, "prompt": ids.shape[1], "prefilled": ids.shape[1]})
        messages.append({"role": "assistant", "content": answer})
    return rows


# ---------------------------------------------------------------------------- report
def report(runs: dict, notes: list[str]) -> dict:
    names = list(runs)
    print(f"{'turn':>4}{'prompt':>8}" + "".join(f"{n + ' TTFT s':>24}{'prefilled':>11}" for n in names))
    for i in range(len(TURNS)):
        row = f"{i + 1:>4}{runs[names[0]][i]['prompt'] or 0:>8}"
        for n in names:
            r = runs[n][i]
            row += f"{r['ttft_s']:>24.3f}{'n/a' if r['prefilled'] is None else r['prefilled']:>11}"
        print(row)
    totals = {n: {"ttft_s": round(sum(r["ttft_s"] for r in rows), 3),
                  "prefilled": (None if any(r["prefilled"] is None for r in rows)
                                else sum(r["prefilled"] for r in rows))} for n, rows in runs.items()}
    print("total" + "".join(f"  {n}: {t['ttft_s']} s, {t['prefilled']} tokens prefilled" for n, t in totals.items()))
    for note in notes:
        print("note:", note)
    return {"bench": "chat", "turns": len(TURNS), "totals": totals, "notes": notes,
            "per_turn": {n: [{"ttft_s": round(r["ttft_s"], 4), "prompt": r["prompt"], "prefilled": r["prefilled"]}
                             for r in rows] for n, rows in runs.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="2B", help="random-weight architecture (qwen3vl.bench), e.g. 2B or tiny")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--model", default=None, help="a checkpoint folder instead of random weights")
    p.add_argument("--tokens", type=int, default=32, help="answer length of each turn")
    p.add_argument("--image-size", type=int, default=448, help="side of the two square images, in pixels")
    p.add_argument("--skip-reference", action="store_true")
    args = p.parse_args(argv)
    path = args.model or with_tokenizer(checkpoint(args.arch, args.dtype))
    uris, notes = media_uris(args.image_size), []
    runs = {"ours": run_ours(path, ["--dtype", args.dtype], args, uris, None)}
    answers = [r["answer"] for r in runs["ours"]]
    if "--no-enable-prefix-caching" in serve_flags():
        runs["ours no-cache"] = run_ours(path, ["--dtype", args.dtype, "--no-enable-prefix-caching"], args, uris,
                                         answers)
    else:
        notes.append("ours without caches skipped: this server has no --no-enable-prefix-caching flag")
    if any(r["prefilled"] is None for r in runs["ours"]):
        notes.append("the server reports no usage.prompt_tokens_details.cached_tokens: prefilled counts n/a")
    if not args.skip_reference:
        runs["reference"] = run_reference(path, args, uris, answers)
    print(json.dumps(report(runs, notes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
