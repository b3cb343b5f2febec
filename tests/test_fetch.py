"""Remote media fetching (``qwen3vl.processor.fetch``) against a loopback HTTP server in a thread:
address and scheme rules (server-side request forgery), redirects checked hop by hop, size caps
before and while reading, the per-item deadline against a server that drips, local size caps."""
from __future__ import annotations

import http.server
import io
import socket
import threading
import time

import pytest
from PIL import Image

from processor_fixtures import processor, processor_dir  # noqa: F401
from qwen3vl.processor import (ForbiddenURLError, MediaFetchError, MediaLimitError, MediaLimits, Processor)
from qwen3vl.processor import fetch
from qwen3vl.processor.media import load_image

MIB = 1 << 20
PNG = io.BytesIO()
Image.new("RGB", (8, 8), (200, 10, 10)).save(PNG, "PNG")
PNG = PNG.getvalue()
LOCAL = MediaLimits(allow_private=False, allowed_domains=("localhost",))  # the test server by name only


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sent: dict = {}  # path -> body bytes written (what the client made the server send)
    hosts: list = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        Handler.hosts.append(self.headers.get("Host"))
        route = getattr(self, "route_" + self.path.strip("/").split("?")[0].replace("-", "_"), None)
        if route is None:
            self.send_error(404)
        else:
            route()

    def _headers(self, status=200, **headers):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()

    def _write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            return False
        Handler.sent[self.path] = Handler.sent.get(self.path, 0) + len(data)
        return True

    def route_img(self):
        self._headers(Content_Type="image/png", Content_Length=str(len(PNG)))
        self._write(PNG)

    def route_to_loopback(self):  # an allowed host sending the client to a refused address
        self._headers(302, Location=f"http://127.0.0.1:{self.server.server_port}/img", Content_Length="0")

    def route_to_loopback2(self):
        self._headers(302, Location=f"http://127.0.0.2:{self.server.server_port}/img", Content_Length="0")

    def route_to_ftp(self):
        self._headers(301, Location="ftp://localhost/img.png", Content_Length="0")

    def route_relative(self):
        self._headers(307, Location="/img", Content_Length="0")

    def route_loop(self):
        self._headers(302, Location="/loop", Content_Length="0")

    def route_huge(self):  # announces 2 GB, then would send it slowly
        self._headers(Content_Length=str(2 << 30))
        for _ in range(50):
            if not self._write(b"\0" * 65536):
                return
            time.sleep(0.1)

    def route_endless(self):  # chunked, for ever (until the client hangs up)
        self._headers(Transfer_Encoding="chunked")
        chunk = b"%x\r\n" % 65536 + b"\1" * 65536 + b"\r\n"
        for _ in range(4096):  # 256 MiB at most, should the client never stop
            if not self._write(chunk):
                return

    def route_drip(self):  # one byte per second: each read succeeds well within the read timeout
        self._headers(Content_Length="1000")
        for _ in range(30):
            if not self._write(b"x"):
                return
            time.sleep(1.0)

    def route_drip_headers(self):  # even the status line drips
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 60:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_port
    httpd.shutdown()
    httpd.server_close()


def url(port, path, host="localhost"):
    return f"http://{host}:{port}/{path}"


def test_fetch_through_allowed_domain_with_host_header(server):
    Handler.hosts.clear()
    assert fetch.fetch_url(url(server, "img"), LOCAL) == PNG
    assert Handler.hosts == [f"localhost:{server}"]
    assert load_image(url(server, "img"), limits=LOCAL).size == (8, 8)
    assert fetch.fetch_url(url(server, "relative"), LOCAL) == PNG  # a relative redirect, same host


def test_loopback_refused_without_allow_private(server):
    for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]"):
        with pytest.raises(ForbiddenURLError, match=r"image #3 .*(loopback|private|reserved).*allow_private=False"):
            load_image(url(server, "img", host), index=3, limits=MediaLimits(allow_private=False))
    assert fetch.fetch_url(url(server, "img", "127.0.0.1"), MediaLimits()) == PNG  # the library's default


def test_hostname_resolving_to_loopback_refused(server, monkeypatch):
    real = socket.getaddrinfo

    def rebinding(host, *args, **kw):  # a public-looking name whose DNS answer is loopback
        return real("127.0.0.1" if host == "media.example.com" else host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with pytest.raises(ForbiddenURLError, match=r"media\.example\.com resolves to 127\.0\.0\.1, a loopback"):
        fetch.fetch_url(url(server, "img", "media.example.com"), MediaLimits(allow_private=False))


def test_allowed_domains_only(server):
    with pytest.raises(ForbiddenURLError, match="'127.0.0.1' is not in allowed_domains"):
        fetch.fetch_url(url(server, "img", "127.0.0.1"), LOCAL)
    assert fetch.host_allowed("cdn.Media.example.org.", ("media.example.org",))
    assert not fetch.host_allowed("evilmedia.example.org", ("media.example.org",))
    assert not fetch.host_allowed("127.0.0.1", ("0.1",))  # addresses match whole, never by suffix


def test_redirects_checked_at_every_hop(server, monkeypatch):
    with pytest.raises(ForbiddenURLError, match=r"refused URL http://127\.0\.0\.1:\d+/img: host '127.0.0.1' is not"):
        fetch.fetch_url(url(server, "to-loopback"), LOCAL)
    with pytest.raises(ForbiddenURLError, match=r"ftp://localhost/img\.png: scheme 'ftp'"):
        fetch.fetch_url(url(server, "to-ftp"), LOCAL)
    with pytest.raises(ForbiddenURLError, match=r"more than 5 redirects \(max_redirects\)"):
        fetch.fetch_url(url(server, "loop"), LOCAL)
    # the address rule at a later hop: 127.0.0.1 passes for "public" here, the redirect to 127.0.0.2 must not
    real = fetch.address_problem
    monkeypatch.setattr(fetch, "address_problem", lambda a: None if a == "127.0.0.1" else real(a))
    with pytest.raises(ForbiddenURLError, match=r"refused URL http://127\.0\.0\.2:\d+/img: .* a loopback address"):
        fetch.fetch_url(url(server, "to-loopback2", "127.0.0.1"), MediaLimits(allow_private=False))


def test_other_schemes_refused():
    for bad in ("ftp://example.com/a.png", "gopher://example.com/", "http:///nohost.png", "http://h:99999/x"):
        with pytest.raises(ForbiddenURLError):
            fetch.fetch_url(bad, MediaLimits())


def test_content_length_over_cap_refused_before_reading(server):
    Handler.sent.pop("/huge", None)
    start = time.monotonic()
    with pytest.raises(MediaLimitError, match=r"Content-Length 2147483648 is over max_download_bytes=1048576"):
        fetch.fetch_url(url(server, "huge"), MediaLimits(allow_private=True, max_download_bytes=MIB))
    assert time.monotonic() - start < 2.0
    time.sleep(0.3)
    assert Handler.sent.get("/huge", 0) <= 4 * 65536  # the body was never read


def test_endless_chunked_stream_cut_at_cap(server):
    Handler.sent.pop("/endless", None)
    with pytest.raises(MediaLimitError, match=r"download is over max_download_bytes=2097152"):
        fetch.fetch_url(url(server, "endless"), MediaLimits(max_download_bytes=2 * MIB))
    time.sleep(0.3)
    assert Handler.sent.get("/endless", 0) < 2 * MIB + 8 * MIB  # the cap plus what socket buffers hold


@pytest.mark.parametrize("path", ["drip", "drip-headers"])
def test_drip_hits_item_deadline_before_read_timeouts(server, path):
    limits = MediaLimits(read_timeout_s=10, item_deadline_s=1.5)
    start = time.monotonic()
    with pytest.raises(MediaLimitError, match=r"outlasted the deadline \(item_deadline_s=1\.5\)"):
        fetch.fetch_url(url(server, path), limits)
    assert 1.4 < time.monotonic() - start < 4.0


def test_request_deadline_handed_down(server):
    limits = MediaLimits(read_timeout_s=10, item_deadline_s=60, request_deadline_s=300)
    start = time.monotonic()
    with pytest.raises(MediaLimitError, match=r"request_deadline_s=300"):
        fetch.fetch_url(url(server, "drip"), limits, deadline=time.monotonic() + 1.0)
    assert time.monotonic() - start < 3.5
    with pytest.raises(MediaLimitError, match="no time left"):
        fetch.fetch_url(url(server, "img"), limits, deadline=time.monotonic() - 1)


def test_processor_passes_its_limits(server, processor_dir):
    proc = Processor.from_pretrained(processor_dir, limits=MediaLimits(allow_private=False))
    conv = [{"role": "user", "content": [{"type": "image", "image": url(server, "img", "127.0.0.1")},
                                         {"type": "text", "text": "?"}]}]
    with pytest.raises(ForbiddenURLError, match=r"image #0 \(http://127\.0\.0\.1.*loopback"):
        proc.apply_chat_template(conv, tokenize=True, return_dict=True)
    ok = Processor.from_pretrained(processor_dir, limits=LOCAL)
    conv[0]["content"][0]["image"] = url(server, "img")
    assert ok.apply_chat_template(conv, tokenize=True, return_dict=True)["image_grid_thw"].tolist() == [[1, 16, 16]]


def test_local_file_and_data_url_size_caps(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    with pytest.raises(MediaLimitError, match=rf"file of {len(PNG)} bytes is over max_file_bytes=10"):
        load_image(str(path), limits=MediaLimits(max_file_bytes=10))
    assert load_image(str(path), limits=MediaLimits(max_file_bytes=len(PNG))).size == (8, 8)
    data = "data:image/png;base64," + "A" * (4 * MIB)
    with pytest.raises(MediaLimitError, match=r"data: URL of about 3145728 bytes is over max_download_bytes=1048576"):
        load_image(data, limits=MediaLimits(max_download_bytes=MIB))


@pytest.mark.parametrize("address, problem", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("10.1.2.3", "private"),
    ("192.168.0.1", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("2002:7f00:1::", "loopback"),
    ("100.64.0.1", "non-global"), ("240.0.0.1", "private"), ("8.8.8.8", None), ("2606:4700::1111", None)])
def test_address_rules(address, problem):
    got = fetch.address_problem(address)
    assert got == problem or (problem and got in ("private", "reserved")), (address, got)


def test_unreachable_and_http_errors(server):
    with pytest.raises(MediaFetchError, match="HTTP 404"):
        fetch.fetch_url(url(server, "nothing-here"), LOCAL)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(MediaFetchError, match="could not fetch URL"):
        fetch.fetch_url(f"http://127.0.0.1:{port}/x", MediaLimits())


def _self_signed(folder, name: str):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
                   check=True, capture_output=True)
    return str(cert), str(key)


@pytest.mark.parametrize("cert_name", ["localhost", "other.example"])
def test_https_server_name_and_certificate(tmp_path, monkeypatch, cert_name):
    import ssl

    cert, key = _self_signed(tmp_path, cert_name)
    seen = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: seen.append(name)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    https = f"https://localhost:{httpd.server_port}/img"
    try:
        with pytest.raises(MediaFetchError, match="certificate verify failed"):  # not trusted by the system store
            fetch.fetch_url(https, LOCAL)
        make = ssl.create_default_context
        monkeypatch.setattr(ssl, "create_default_context", lambda: make(cafile=cert))
        if cert_name == "localhost":
            assert fetch.fetch_url(https, LOCAL) == PNG
        else:  # trusted, but for another name
            with pytest.raises(MediaFetchError, match="certificate verify failed.*(mismatch|match)"):
                fetch.fetch_url(https, LOCAL)
        assert seen and set(seen) == {"localhost"}  # the URL's host went out as the TLS server name
    finally:
        httpd.shutdown()
        httpd.server_close()
