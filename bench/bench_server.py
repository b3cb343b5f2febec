"""HTTP server throughput: 8 concurrent chat requests vs the same 8 one after another.

Starts ``qwen3vl serve`` (the tiny demo checkpoint unless --model) on a free loopback port, warms
it up, then times each mode ``--repeats`` times (median). Every request asks for exactly
``--tokens`` tokens (``min_tokens`` = ``max_tokens``, greedy) so both modes do the same work;
continuous batching should make the concurrent run much faster than the sequential one
(target: concurrent < 1/3 of sequential on the demo checkpoint). Only stdlib HTTP is used.

Prints a table, then ONE JSON line. Run alone: timings on a busy machine are meaningless.
Usage: python bench/bench_server.py [--requests 8] [--tokens 64] [--repeats 3] [--model PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwen3vl.cli", "serve", "--port", str(port), "--max-num-seqs",
           str(args.requests), "--max-model-len", "2048"]
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


def ask(url: str, i: int, tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"Request {i}: write a long story about lighthouses."}],
            "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=None, help="checkpoint (default: the tiny demo checkpoint)")
    args = p.parse_args()
    port, load_before = free_port(), os.getloadavg()
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w", prefix="bench_server-", suffix=".log", delete=False) as log:
        proc = start_server(args, port, log)
        try:
            run_mode(url, args.requests, 8, concurrent=True)  # warm-up: first prefills, allocator
            seq, con, same = [], [], True
            for _ in range(args.repeats):
                t, a = run_mode(url, args.requests, args.tokens, concurrent=False)
                seq.append(t)
                t, b = run_mode(url, args.requests, args.tokens, concurrent=True)
                con.append(t)
                same &= a == b
        finally:
            proc.terminate()
            proc.wait(10)
    t_seq, t_con = statistics.median(seq), statistics.median(con)
    total = args.requests * args.tokens
    print(f"{args.requests} requests x {args.tokens} tokens, median of {args.repeats}; "
          f"load avg before: {load_before[0]:.2f}")
    print(f"{'mode':<12}{'wall (s)':>10}{'tokens/s':>10}{'req/s':>8}")
    for name, t in (("sequential", t_seq), ("concurrent", t_con)):
        print(f"{name:<12}{t:>10.2f}{total / t:>10.1f}{args.requests / t:>8.2f}")
    ratio = t_con / t_seq
    print(f"concurrent / sequential = {ratio:.3f} (target < 0.333); greedy outputs identical: {same}")
    print(json.dumps({"bench": "server", "requests": args.requests, "tokens": args.tokens,
                      "sequential_s": round(t_seq, 3), "concurrent_s": round(t_con, 3),
                      "ratio": round(ratio, 3), "target_met": ratio < 1 / 3, "outputs_identical": same,
                      "loadavg_before": round(load_before[0], 2), "model": args.model or "demo"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
