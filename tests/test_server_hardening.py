"""The HTTP server against hostile clients: a real ``qwen3vl serve`` (default limits, see
test_server.py for the process helper) fed bodies and headers a browser page, a scanner or a
careless client could send. Every answer is an OpenAI-style JSON error, fast, with a bounded
memory cost (peak RSS growth of the server process, read from /proc), and the server stays healthy.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_server import ServerProcess, _assert_error, _post, home  # noqa: F401

httpx = pytest.importorskip("httpx")

MB = 1 << 20
RSS_BOUND_MB = 300
GROWTH: dict[str, float] = {}  # case -> peak RSS growth of the server over its RSS just before (MB)
ABOVE_START: dict[str, float] = {}  # case -> peak RSS over the server's RSS once warmed up (MB)


# ---------------------------------------------------------------------------- helpers
def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@contextlib.contextmanager
def peak_growth(server: ServerProcess, case: str):
    """Record the server's peak RSS growth (MB) over the block: VmHWM after resetting it, or
    VmRSS sampled every 2 ms where the peak cannot be reset."""
    pid = server.proc.pid
    base = _status_kb(pid, "VmRSS")
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        sampler = None
    except OSError:
        peak, stop = [base], threading.Event()

        def sample():
            while not stop.wait(0.002):
                peak.append(_status_kb(pid, "VmRSS"))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    yield
    if sampler is None:
        top = _status_kb(pid, "VmHWM")
    else:
        stop.set()
        sampler.join()
        top = max(peak)
    GROWTH[case] = max(GROWTH.get(case, 0.0), (top - base) / 1024)
    ABOVE_START[case] = max(ABOVE_START.get(case, 0.0), (top - server.baseline_kb) / 1024)
    assert GROWTH[case] < RSS_BOUND_MB, (case, GROWTH[case])
    assert ABOVE_START[case] < RSS_BOUND_MB, (case, ABOVE_START[case])


def raw_exchange(port: int, head: bytes, chunks=(), pause: float = 0.0) -> bytes:
    """Send a request as raw bytes (a reader thread collects the answer while we send, so an early
    answer followed by a reset is still seen); returns what the server sent back."""
    got: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        def read():
            with contextlib.suppress(OSError):
                while data := sock.recv(65536):
                    got.append(data)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        with contextlib.suppress(OSError):
            sock.sendall(head)
            for chunk in chunks:
                sock.sendall(chunk)
        time.sleep(pause)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        reader.join(30)
    return b"".join(got)


def chat(text: str = "hi", **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 2, **extra}


@pytest.fixture(scope="module")
def server(home):  # noqa: F811
    srv = ServerProcess(home, "--allow-private-media")  # otherwise default limits
    assert _post(url(srv), chat()).status_code == 200  # warm up before taking the baseline
    srv.baseline_kb = _status_kb(srv.proc.pid, "VmRSS")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cors_server(home):  # noqa: F811
    srv = ServerProcess(home, "--allowed-origins", "http://app.example", "--allowed-hosts", "api.example,127.0.0.1")
    yield srv
    srv.stop()


def url(server, path="/v1/chat/completions") -> str:
    return server.url + path


# ---------------------------------------------------------------------------- cross-site
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json; charset=latin-1"])
def test_post_bodies_must_be_json(server, content_type):
    headers = {"Origin": "http://evil.example"} | ({"Content-Type": content_type} if content_type else {})
    resp = httpx.post(url(server), content=json.dumps(chat()).encode(), headers=headers, timeout=30)
    err = _assert_error(resp, 415)
    assert "application/json" in err["message"]
    assert "access-control-allow-origin" not in resp.headers


def test_foreign_host_refused(server):
    resp = httpx.get(url(server, "/health"), headers={"Host": "attacker.example"})
    err = _assert_error(resp, 421, "Host")
    assert "--allowed-hosts" in err["message"] and "attacker.example" in err["message"]
    _assert_error(_post(url(server), chat(), {"Host": f"evil.example:{server.port}"}), 421)
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]", "LOCALHOST"):
        assert httpx.get(url(server, "/health"), headers={"Host": host}).status_code == 200, host


def test_cors_off_by_default(server):
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    resp = httpx.options(url(server), headers=preflight)
    assert resp.status_code >= 400 and "access-control-allow-origin" not in resp.headers


def test_cors_with_allowed_origins(cors_server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = httpx.options(url(cors_server), headers={"Origin": "http://app.example", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
    bad = httpx.options(url(cors_server), headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in bad.headers
    resp = _post(url(cors_server), chat(), {"Origin": "http://app.example", "Host": "api.example"})
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "http://app.example"
    _assert_error(_post(url(cors_server), chat(), {"Host": "localhost"}), 421)  # the list replaces the default


# ---------------------------------------------------------------------------- JSON
DEEP = 5000


@pytest.mark.parametrize("case,body", [
    ("deep messages", b'{"messages": [{"role": "user", "content": ' + b"[" * DEEP + b"]" * DEEP + b"}]}"),
    ("deep tools", b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"a": '
     + b'{"b": ' * DEEP + b"1" + b"}" * DEEP + b"}]}"),
    ("just over the depth", b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 64 + b"]" * 64 + b"}"),
    ("deep and broken", b"[" * 50_000),
    ("escaped quotes", b'{"a": "' + b'\\"[' * 200_000 + b'"}'),  # brackets inside a string are not nesting
])
def test_deep_json(server, case, body):
    with peak_growth(server, "deep JSON"):
        resp = _post(url(server), body)
    if case == "escaped quotes":
        _assert_error(resp, 400, "messages")  # parsed fine: it only lacks messages
    else:
        assert "nested" in _assert_error(resp, 400)["message"]


@pytest.mark.parametrize("body,param", [
    (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"messages": [{"role": "user", "content": "hi \\udfff there"}]}', "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages[0].content[0].text"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "\\udc00"]}', "stop[1]"),
])
def test_lone_surrogates(server, body, param):
    err = _assert_error(_post(url(server), body), 400, param)
    assert "surrogate" in err["message"]
    raw = _post(url(server), body.replace(b"\\ud800", b"\xed\xa0\x80"))  # the surrogate as raw bytes
    assert raw.status_code == 400
    emoji = _post(url(server), b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 1}')
    assert emoji.status_code == 200  # a proper pair is fine


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b"1" * 5000])
def test_non_finite_numbers(server, value):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + value + b"}"
    assert "JSON" in _assert_error(_post(url(server), body), 400)["message"]


def test_too_many_values(server):
    """A million stop strings (or any million values) is refused before parsing."""
    body = chat(stop=["a"] * 1_000_000)
    t0 = time.perf_counter()
    with peak_growth(server, "stop strings"):
        err = _assert_error(_post(url(server), body), 400)
    assert time.perf_counter() - t0 < 5 and "JSON values" in err["message"]
    with peak_growth(server, "deep JSON"):
        _assert_error(_post(url(server), b"[" + b"{}," * 2_000_000 + b"{}]"), 400)


# ---------------------------------------------------------------------------- request sizes
def test_huge_prompt_refused_before_tokenizing(server):
    limit = 16 * server.health()["max_model_len"]
    for endpoint, body, param in (("/v1/chat/completions", chat("a" * (16 * MB)), "messages"),
                                  ("/v1/completions", {"prompt": "a " * (8 * MB), "max_tokens": 2}, "prompt")):
        t0 = time.perf_counter()
        with peak_growth(server, "huge prompt"):
            err = _assert_error(_post(url(server, endpoint), body), 400, param)
        assert time.perf_counter() - t0 < 5
        assert err["code"] == "context_length_exceeded" and str(limit) in err["message"]


@pytest.mark.parametrize("extra,param", [
    ({"stop": ["x"] * 17}, "stop"), ({"stop": "x" * 257}, "stop"), ({"n": 17}, "n"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"), ({"stop_token_ids": [2**40]}, "stop_token_ids"),
    ({"tools": [{"type": "function"}] * 129}, "tools"), ({"tools": {"a": 1}}, "tools"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
])
def test_bounded_fields(server, extra, param):
    _assert_error(_post(url(server), chat(**extra)), 400, param)


def test_bounded_counts(server):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"messages": [{"role": "user", "content": [image] * 5}]}
    assert _assert_error(_post(url(server), body), 400, "messages")["code"] == "too_many_media"
    many = {"messages": [{"role": "user", "content": ""}] * (server.health()["max_model_len"] // 4 + 1)}
    assert _assert_error(_post(url(server), many), 400, "messages")["code"] == "context_length_exceeded"
    _assert_error(_post(url(server, "/v1/completions"), {"prompt": ["a"] * 17}), 400, "prompt")
    _assert_error(_post(url(server, "/v1/completions"), {"prompt": ["a"] * 8, "n": 9}), 400, "prompt")


def test_oversized_body(server):
    limit = 32 * MB
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {limit + 1}\r\n\r\n").encode()
    with peak_growth(server, "huge body"):
        answer = raw_exchange(server.port, head)  # refused from Content-Length, before any byte is read
    assert b" 413 " in answer.split(b"\r\n")[0] and b"request_too_large" in answer
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n%s\r\n" % (MB, b" " * MB)
    with peak_growth(server, "huge body"):
        answer = raw_exchange(server.port, chunked, [piece] * 33, pause=0.5)
    assert b" 413 " in answer.split(b"\r\n")[0], answer[:200]
    assert server.health()["status"] == "ok"


def test_client_dropping_mid_upload_is_quiet(server):
    before = server.output()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b'{"messages": [' + b" " * 100_000)
    time.sleep(1.0)
    assert server.health()["status"] == "ok"
    new = server.output()[len(before):]
    assert "Traceback" not in new and "Exception" not in new, new


# ---------------------------------------------------------------------------- slow media
class Drip(http.server.BaseHTTPRequestHandler):
    """An 'image' that arrives one byte every 0.2 s, until the test says stop."""

    stop = threading.Event()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        with contextlib.suppress(OSError):
            while not self.stop.wait(0.2):
                self.wfile.write(b"x")
                self.wfile.flush()

    def log_message(self, *args):
        pass


def test_slow_media_do_not_block_text(server):
    t0 = time.perf_counter()
    assert _post(url(server), chat(max_tokens=1)).status_code == 200
    t_alone = time.perf_counter() - t0
    drip = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    drip.daemon_threads = True
    threading.Thread(target=drip.serve_forever, daemon=True).start()
    image = {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{drip.server_address[1]}/slow.png"}}
    slow = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "?"}]}], "max_tokens": 2}
    pool = ThreadPoolExecutor(8)
    try:
        futures = [pool.submit(_post, url(server), slow) for _ in range(8)]
        deadline = time.monotonic() + 20
        while server.health()["preparing"]["media"] < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.health()["preparing"]["media"] == 8
        t0 = time.perf_counter()
        assert httpx.get(url(server, "/health"), timeout=5).status_code == 200
        t_health = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert _post(url(server), chat(max_tokens=1)).status_code == 200
        t_text = time.perf_counter() - t0
        print(f"\nwith 8 slow media requests in flight: /health {t_health:.3f} s, text request {t_text:.3f} s "
              f"(alone before: {t_alone:.3f} s)")
        assert t_health < 1 and t_text < 1
    finally:
        Drip.stop.set()
        drip.shutdown()
        statuses = [f.result().status_code for f in futures]
        pool.shutdown()
    assert all(400 <= s < 500 for s in statuses), statuses  # a truncated image, refused
    assert server.health()["preparing"] == {"text": 0, "media": 0}


# ---------------------------------------------------------------------------- in process
def test_flags_to_settings_and_limits(tmp_path):
    from qwen3vl import cli
    from qwen3vl.server.settings import ServeSettings

    args = cli.build_parser().parse_args([
        "serve", "--limit-mm-per-prompt", '{"image": 8, "video": 2}', "--max-media-pixels", "1000000",
        "--max-media-frames", "16", "--max-media-bytes", "4", "--media-fetch-timeout", "5", "--allow-private-media",
        "--allowed-media-domains", "a.example,b.example", "--allowed-hosts", "x.example", "y.example",
        "--allowed-origins", "http://app.example", "--max-body-mb", "8", "--media-workers", "2",
        "--max-num-batched-tokens", "256"])
    s = cli.serve_settings(args)
    assert (s.max_images, s.max_videos, s.allowed_hosts) == (8, 2, ("x.example", "y.example"))
    assert s.max_num_batched_tokens == 256
    assert s.host_allow_list() == {"x.example", "y.example"} and s.max_body_bytes == 8 * MB
    m = s.media_limits()
    assert (m.max_images, m.max_image_pixels, m.max_option_pixels, m.max_frames, m.max_download_bytes) == (
        8, 1_000_000, 1_000_000, 16, 4 * MB)
    assert (m.item_deadline_s, m.allow_private, m.allowed_domains) == (5.0, True, ("a.example", "b.example"))
    assert ServeSettings().host_allow_list() == {"127.0.0.1", "localhost", "::1"}
    assert ServeSettings(host="0.0.0.0").host_allow_list() is None
    assert ServeSettings(allowed_hosts=("*",)).host_allow_list() is None
    assert ServeSettings().media_limits().allow_private is False
    for text in ("[1]", "{bad", '{"audio": 1}', '{"image": -1}', '{"image": true}'):
        with pytest.raises(ValueError, match="limit-mm-per-prompt"):
            cli.serve_settings(cli.build_parser().parse_args(["serve", "--limit-mm-per-prompt", text]))
    for bad in (dict(max_body_mb=0), dict(media_workers=0), dict(max_media_pixels=0), dict(max_media_frames=0),
                dict(media_fetch_timeout=-1), dict(allowed_hosts=("a b",)), dict(allowed_origins=("app.example",)),
                dict(max_num_batched_tokens=8)):
        with pytest.raises(ValueError):
            ServeSettings(**bad)


def test_host_names_and_error_rendering():
    from qwen3vl.server.errors import error_body
    from qwen3vl.server.guard import host_name

    assert [host_name(h) for h in ("A.example:80", "[::1]:8000", "[::1]", "::1", "x", "")] == [
        "a.example", "::1", "::1", "::1", "x", ""]
    body = error_body("bad \ud800 value" + "x" * 5000, param="model\udfff")
    json.dumps(body).encode("utf-8")  # renders
    assert "\\ud800" in body["error"]["message"] and len(body["error"]["message"]) <= 2000
    assert body["error"]["param"] == "model\\udfff"


def test_bounded_pool_refuses_when_full():
    import asyncio

    from qwen3vl.server.errors import ProtocolError
    from qwen3vl.server.pools import BoundedPool

    release = threading.Event()

    async def main():
        pool = BoundedPool("media", workers=1, backlog=1)
        held = [asyncio.ensure_future(pool.run(release.wait)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(ProtocolError) as info:
            await pool.run(int)
        assert (info.value.status, info.value.code) == (503, "server_busy")
        release.set()
        await asyncio.gather(*held)
        assert pool.pending == 0 and await pool.run(int, "7") == 7

    asyncio.run(main())


# ---------------------------------------------------------------------------- afterwards
def test_server_healthy_afterwards(server):
    assert server.health()["status"] == "ok"
    assert _post(url(server), chat()).status_code == 200
    assert "Traceback" not in server.output()
    for name, table in (("over the RSS just before", GROWTH), ("over the warmed-up server's RSS", ABOVE_START)):
        worst = max(table.items(), key=lambda kv: kv[1], default=("none", 0.0))
        print(f"\npeak RSS growth per hostile request, {name} (MB): "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(table.items())) + f"; worst: {worst[0]} {worst[1]:.1f}")
        assert worst[1] < RSS_BOUND_MB
