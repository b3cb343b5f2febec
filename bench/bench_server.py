"""HTTP server benchmarks: batching throughput, and a mixed-traffic load test.

``--mode throughput`` (the default): 8 concurrent chat requests vs the same 8 one after another.
Every request asks for exactly ``--tokens`` tokens (``min_tokens`` = ``max_tokens``, greedy) so
both modes do the same work; continuous batching should make the concurrent run much faster than
the sequential one (target: concurrent < 1/3 of sequential on the demo checkpoint).

``--mode load``: ``--clients`` concurrent clients (default 64) send a mix of text, image, video
and streaming chat requests for ``--duration`` seconds (default 300); reports failures by kind
and status, latency percentiles per kind (time to first token for streams), and the server's RSS
over time, which should stay flat once warmed up (the first quarter of the run).

Starts ``qwen3vl serve`` (the tiny demo checkpoint unless --model) on a free loopback port. Only
stdlib HTTP is used. Prints a table, then ONE JSON line. Run alone: timings on a busy machine are
meaningless. Usage:
    python bench/bench_server.py [--requests 8] [--tokens 64] [--repeats 3] [--model PATH]
    python bench/bench_server.py --mode load [--clients 64] [--duration 300] [--tokens 16]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
KINDS = ("text", "image", "video", "stream")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, log, seqs: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwen3vl.cli", "serve", "--port", str(port), "--max-num-seqs", str(seqs),
           "--max-model-len", "2048"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not come up; see {log.name}")


def post(url: str, body: dict, timeout: float = 600):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


# ---------------------------------------------------------------------------- throughput mode
def ask(url: str, i: int, tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"Request {i}: write a long story about lighthouses."}],
            "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
    with post(url, body) as resp:
        return json.load(resp)


def run_mode(url: str, n: int, tokens: int, concurrent: bool) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(n) as pool:
            out = list(pool.map(lambda i: ask(url, i, tokens), range(n)))
    else:
        out = [ask(url, i, tokens) for i in range(n)]
    elapsed = time.perf_counter() - t0
    assert all(r["usage"]["completion_tokens"] == tokens for r in out), "a request stopped early"
    return elapsed, [r["choices"][0]["message"]["content"] for r in out]


def throughput(args, url: str, load_before) -> dict:
    run_mode(url, args.requests, 8, concurrent=True)  # warm-up: first prefills, allocator
    seq, con, same = [], [], True
    for _ in range(args.repeats):
        t, a = run_mode(url, args.requests, args.tokens, concurrent=False)
        seq.append(t)
        t, b = run_mode(url, args.requests, args.tokens, concurrent=True)
        con.append(t)
        same &= a == b
    t_seq, t_con = statistics.median(seq), statistics.median(con)
    total = args.requests * args.tokens
    print(f"{args.requests} requests x {args.tokens} tokens, median of {args.repeats}; "
          f"load avg before: {load_before[0]:.2f}")
    print(f"{'mode':<12}{'wall (s)':>10}{'tokens/s':>10}{'req/s':>8}")
    for name, t in (("sequential", t_seq), ("concurrent", t_con)):
        print(f"{name:<12}{t:>10.2f}{total / t:>10.1f}{args.requests / t:>8.2f}")
    ratio = t_con / t_seq
    print(f"concurrent / sequential = {ratio:.3f} (target < 0.333); greedy outputs identical: {same}")
    return {"bench": "server", "requests": args.requests, "tokens": args.tokens, "sequential_s": round(t_seq, 3),
            "concurrent_s": round(t_con, 3), "ratio": round(ratio, 3), "target_met": ratio < 1 / 3,
            "outputs_identical": same}


# ---------------------------------------------------------------------------- load mode
def media_uris() -> dict:
    """A small PNG and a small MP4 as data: URIs (made here, so the bench needs no files)."""
    import av
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(buf, format="PNG")
    png = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(8):
            frame = np.full((64, 64, 3), i * 30, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return {"image": png, "video": "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()}


def load_body(kind: str, i: int, tokens: int, uris: dict) -> dict:
    text = {"type": "text", "text": f"Request {i}: describe this."}
    content = {"text": f"Request {i}: tell me about lighthouses.", "stream": text["text"],
               "image": [{"type": "image_url", "image_url": {"url": uris["image"]}}, text],
               "video": [{"type": "video_url", "video_url": {"url": uris["video"]}}, text]}[kind]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": tokens, "stream": kind == "stream"}


def one_request(url: str, kind: str, i: int, tokens: int, uris: dict) -> tuple[str, float]:
    """(status, latency in s: time to first token for streams)."""
    t0 = time.perf_counter()
    try:
        with post(url, load_body(kind, i, tokens, uris), timeout=300) as resp:
            if kind != "stream":
                json.load(resp)
                return "ok", time.perf_counter() - t0
            first, events, done = None, 0, False
            for line in resp:
                events += line.startswith(b"data:")
                if events == 2 and first is None:  # the first event only carries the role
                    first = time.perf_counter() - t0
                done = done or line.strip() == b"data: [DONE]"
            return ("ok" if done else "cut"), first or time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return str(e.code), time.perf_counter() - t0
    except OSError as e:
        return type(e).__name__, time.perf_counter() - t0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def load(args, url: str, pid: int) -> dict:
    uris, stop, lock = media_uris(), threading.Event(), threading.Lock()
    results: dict[str, list] = {k: [] for k in KINDS}
    rss: list[tuple[float, float]] = []
    t_start = time.monotonic()

    def client(c: int) -> None:
        rng = random.Random(c)
        while not stop.is_set():
            kind = rng.choice(KINDS)
            status, latency = one_request(url, kind, c, args.tokens, uris)
            with lock:
                results[kind].append((status, latency))

    def sampler() -> None:
        while not stop.wait(1.0):
            rss.append((time.monotonic() - t_start, rss_mb(pid)))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
    threads.append(threading.Thread(target=sampler, daemon=True))
    for t in threads:
        t.start()
    time.sleep(args.duration)
    stop.set()
    for t in threads:
        t.join(330)
    return report_load(args, results, rss)


def report_load(args, results: dict, rss: list) -> dict:
    print(f"{args.clients} clients, {args.duration:g} s, {args.tokens} tokens a request (stream latency: time to "
          "first token)")
    print(f"{'kind':<8}{'requests':>9}{'failed':>8}{'p50 (s)':>9}{'p90 (s)':>9}{'p99 (s)':>9}  failures")
    kinds = {}
    for kind, rows in results.items():
        ok = sorted(t for s, t in rows if s == "ok")
        failed = {}
        for s, _ in rows:
            if s != "ok":
                failed[s] = failed.get(s, 0) + 1
        pct = {p: round(ok[min(len(ok) - 1, int(p / 100 * len(ok)))], 3) if ok else None for p in (50, 90, 99)}
        kinds[kind] = {"requests": len(rows), "failed": sum(failed.values()), "failures": failed,
                       **{f"p{p}_s": v for p, v in pct.items()}}
        print(f"{kind:<8}{len(rows):>9}{sum(failed.values()):>8}"
              + "".join(f"{'-' if v is None else v:>9}" for v in pct.values()) + f"  {failed or ''}")
    warm = next((mb for t, mb in rss if t >= args.duration / 4), rss[-1][1] if rss else 0.0)
    end, peak = (rss[-1][1], max(mb for _, mb in rss)) if rss else (0.0, 0.0)
    step = max(1, len(rss) // 10)
    print("server RSS (MB) over time: " + ", ".join(f"{t:.0f}s {mb:.0f}" for t, mb in rss[::step]))
    print(f"RSS after warm-up {warm:.0f} MB, at the end {end:.0f} MB (drift {end - warm:+.0f} MB), peak {peak:.0f} MB")
    return {"bench": "server_load", "clients": args.clients, "duration_s": args.duration, "tokens": args.tokens,
            "kinds": kinds, "failed": sum(k["failed"] for k in kinds.values()),
            "rss_warm_mb": round(warm), "rss_end_mb": round(end), "rss_peak_mb": round(peak),
            "rss_drift_mb": round(end - warm)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["throughput", "load"], default="throughput")
    p.add_argument("--requests", type=int, default=8, help="throughput: concurrent requests")
    p.add_argument("--tokens", type=int, default=None, help="tokens a request (throughput 64, load 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=64, help="load: concurrent clients")
    p.add_argument("--duration", type=float, default=300.0, help="load: seconds")
    p.add_argument("--max-num-seqs", type=int, default=None, help="server KV slots (throughput: --requests; "
                   "load: 16)")
    p.add_argument("--model", default=None, help="checkpoint (default: the tiny demo checkpoint)")
    args = p.parse_args()
    args.tokens = args.tokens or (64 if args.mode == "throughput" else 16)
    seqs = args.max_num_seqs or (args.requests if args.mode == "throughput" else 16)
    port, load_before = free_port(), os.getloadavg()
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w", prefix="bench_server-", suffix=".log", delete=False) as log:
        proc = start_server(args, port, log, seqs)
        try:
            out = throughput(args, url, load_before) if args.mode == "throughput" else load(args, url, proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
    print(json.dumps({**out, "loadavg_before": round(load_before[0], 2), "model": args.model or "demo"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
