"""The bytes of a media source: ``data:`` URLs, local files and ``http(s)://`` URLs, within ``MediaLimits``.

Remote fetches (stdlib only) are guarded against server-side request forgery and slow or huge
answers: only http and https; the host is resolved once and loopback / private / link-local /
multicast / reserved addresses (IPv4-mapped, 6to4 and Teredo forms included) are refused unless
``allow_private`` or the host is in ``allowed_domains``; the connection goes to the checked address
(a second DNS answer cannot swap it), with the URL's Host header and, for https, its TLS server
name and certificate check. Redirects are followed here, at most ``max_redirects``, each hop
checked again. A Content-Length over ``max_download_bytes`` is refused before reading, the stream
is cut at the cap, each read waits ``read_timeout_s`` at most and a watchdog closes the socket at
the item's deadline (``item_deadline_s``, or the call's ``request_deadline_s`` when nearer).
Proxy settings in the environment are not used: the address checked is the address connected to.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from .errors import (EmptyMediaError, ForbiddenURLError, MediaDecodeError, MediaError, MediaFetchError, MediaLimitError,
                     MediaNotFoundError)
from .limits import MediaLimits

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 1 << 16
URL_SAFE = "/%:@!$&'()*+,;=-._~?"  # characters kept as they are in a request line's path / query
# DNS lookups run here so that a hanging resolver cannot outlast the item's deadline
_RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qwen3vl-dns")


@dataclass(frozen=True)
class Deadline:
    """A monotonic time and the limit that set it (named in errors)."""

    at: float
    name: str

    @classmethod
    def for_item(cls, limits: MediaLimits, request_deadline: float | None) -> "Deadline":
        item = cls(time.monotonic() + limits.item_deadline_s, f"item_deadline_s={limits.item_deadline_s:g}")
        if request_deadline is not None and request_deadline < item.at:
            return cls(request_deadline, f"request_deadline_s={limits.request_deadline_s:g}")
        return item

    def left(self) -> float:
        return self.at - time.monotonic()


# --------------------------------------------------------------------------- any source
def fetch_bytes_or_path(source: str, *, kind: str, index: int | None, limits: MediaLimits | None = None,
                        deadline: float | None = None, timeout: float | None = None):
    """Resolve a string source to ``("path", str)`` for local files or ``("bytes", bytes)``."""
    limits = limits or MediaLimits()
    err = dict(kind=kind, index=index, source=source)
    if source.startswith("data:"):
        return "bytes", _data_url(source, limits, err)
    if source.startswith(("http://", "https://")):
        data = fetch_url(source, limits, kind=kind, index=index, deadline=deadline, timeout=timeout)
        if not data:
            raise EmptyMediaError("URL returned no data", **err)
        return "bytes", data
    path = urllib.parse.unquote(urllib.parse.urlparse(source).path) if source.startswith("file://") else source
    if not os.path.isfile(path):
        raise MediaNotFoundError("no such file", **err)
    size = os.path.getsize(path)
    if size == 0:
        raise EmptyMediaError("file is empty (0 bytes)", **err)
    if limits.max_file_bytes is not None and size > limits.max_file_bytes:
        raise MediaLimitError(f"file of {size} bytes is over max_file_bytes={limits.max_file_bytes}", **err)
    return "path", path


def _data_url(source: str, limits: MediaLimits, err: dict) -> bytes:
    header, sep, payload = source.partition(",")
    if not sep:
        raise MediaDecodeError("malformed data: URL (no comma)", **err)
    base64_payload = header.endswith(";base64")
    # decoded size from the text's length: base64 is 4 characters per 3 bytes, %XX escapes 3 per byte
    size = len(payload) * 3 // 4 if base64_payload else len(payload) - 2 * payload.count("%")
    if size > limits.max_download_bytes:
        raise MediaLimitError(f"data: URL of about {size} bytes is over max_download_bytes="
                              f"{limits.max_download_bytes}", **err)
    try:
        if base64_payload:
            return base64.b64decode(payload, validate=False)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise MediaDecodeError(f"invalid base64 payload: {exc}", **err) from None


# --------------------------------------------------------------------------- http(s)
@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str            # as in the URL, lower-case, without brackets
    port: int
    path: str            # path + query, what goes on the request line
    sockaddrs: tuple     # the checked addresses to connect to, in the resolver's order

    @property
    def host_header(self) -> str:
        name = self.host.encode("idna").decode("ascii") if not self.host.isascii() else self.host
        name = f"[{name}]" if ":" in name else name
        return name if self.port == (443 if self.scheme == "https" else 80) else f"{name}:{self.port}"


def fetch_url(url: str, limits: MediaLimits, *, kind: str = "media", index: int | None = None,
              deadline: float | None = None, timeout: float | None = None) -> bytes:
    """GET ``url`` within ``limits`` (see the module docstring); ``deadline``: the call's, monotonic."""
    err = dict(kind=kind, index=index, source=url)
    until = Deadline.for_item(limits, deadline)
    read_timeout = timeout or limits.read_timeout_s
    current = url
    for _hop in range(limits.max_redirects + 1):
        if until.left() <= 0:
            raise MediaLimitError(f"no time left to fetch the URL ({until.name})", **err)
        target = check_url(current, limits, until, err)
        status, location, body = _get(target, limits, until, read_timeout, err)
        if status not in REDIRECTS:
            return body
        if not location:
            raise MediaFetchError(f"HTTP {status} redirect without a Location header", **err)
        current = urllib.parse.urljoin(current, location)
    raise ForbiddenURLError(f"more than {limits.max_redirects} redirects (max_redirects)", **err)


def host_allowed(host: str, domains: tuple[str, ...]) -> bool:
    """``host`` is one of ``domains`` or a subdomain of one (an IP address: only itself)."""
    host = host.lower().rstrip(".")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return any(host == d or host.endswith("." + d) for d in domains)
    return host in domains


def check_url(url: str, limits: MediaLimits, until: Deadline, err: dict) -> _Target:
    """Scheme, host and resolved address of one hop, or ``ForbiddenURLError`` saying which rule refused it."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ForbiddenURLError(f"refused URL {_short(url)}: scheme {scheme or '(none)'!r} (http and https only)",
                                **err)
    try:
        host, port = (parts.hostname or "").rstrip("."), parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ForbiddenURLError(f"refused URL {_short(url)}: invalid port", **err) from None
    if not host:
        raise ForbiddenURLError(f"refused URL {_short(url)}: no host", **err)
    named = limits.allowed_domains is not None and host_allowed(host, limits.allowed_domains)
    if limits.allowed_domains is not None and not named:
        raise ForbiddenURLError(f"refused URL {_short(url)}: host {host!r} is not in allowed_domains", **err)
    candidates = _resolve(host, port, until, err)
    usable = tuple(a for a in candidates if limits.allow_private or named or address_problem(a[0]) is None)
    if not usable:
        first = candidates[0][0]
        raise ForbiddenURLError(f"refused URL {_short(url)}: {host} resolves to {first}, a "
                                f"{address_problem(first)} address (allow_private=False)", **err)
    # non-ASCII in the path / query is sent %-encoded (http.client takes ASCII only)
    path = urllib.parse.quote(parts.path or "/", safe=URL_SAFE)
    path += f"?{urllib.parse.quote(parts.query, safe=URL_SAFE)}" if parts.query else ""
    return _Target(url, scheme, host, port, path, usable)


def address_problem(address: str) -> str | None:
    """Why an address must not be fetched from (``"loopback"``, ``"private"``...), None for a public one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    embedded = []
    if ip.version == 6:  # IPv4 addresses carried inside IPv6 ones reach the same hosts
        embedded = [a for a in (ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None) if a]
    for one in [ip, *embedded]:
        for flag in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
            if getattr(one, f"is_{flag}"):
                return flag.replace("_", "-")
        if not one.is_global:
            return "non-global"
    return None


def _resolve(host: str, port: int, until: Deadline, err: dict) -> list[tuple]:
    """The host's socket addresses (IPv4 / IPv6), looked up once, within the deadline."""
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(until.left(), 0.0))
    except FutureTimeout:
        raise MediaLimitError(f"resolving {host!r} outlasted the deadline ({until.name})", **err) from None
    except (OSError, UnicodeError) as exc:
        raise MediaFetchError(f"could not fetch URL: cannot resolve {host!r}: {exc}", **err) from None
    addresses = [info[4] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if not addresses:
        raise MediaFetchError(f"could not fetch URL: {host!r} has no IPv4 / IPv6 address", **err)
    return addresses


class _Watchdog:
    """Shuts the socket down at the deadline, waking any read blocked on it (a server that drips
    one byte per read timeout would otherwise hold the fetch for ever)."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.fired = False
        self._dup = socket.socket(fileno=os.dup(sock.fileno()))  # the same connection; outlives TLS wrapping
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        try:
            self._dup.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self._timer.cancel()
        self._dup.close()


def _connect(target: _Target, until: Deadline, read_timeout: float):
    """A socket to the first checked address that answers (TLS for https), and its watchdog."""
    sock, failure = None, None
    for sockaddr in target.sockaddrs:
        sock = socket.socket(socket.AF_INET6 if len(sockaddr) == 4 else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(min(read_timeout, max(until.left(), 1e-3)))
            sock.connect(sockaddr)
            break
        except OSError as exc:
            sock.close()
            sock, failure = None, exc
    if sock is None:
        raise failure
    watchdog = _Watchdog(sock, until.left())
    try:
        sock.settimeout(read_timeout)
        if target.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
    except BaseException:
        watchdog.close()
        sock.close()
        raise
    return sock, watchdog


def _get(target: _Target, limits: MediaLimits, until: Deadline, read_timeout: float, err: dict):
    """One GET: (status, Location for redirects, body for the rest)."""
    sock = watchdog = None
    try:
        sock, watchdog = _connect(target, until, read_timeout)
        conn = http.client.HTTPConnection(target.host, target.port)
        conn.sock = sock  # already connected to the checked address: http.client must not resolve again
        conn.request("GET", target.path, headers={"Host": target.host_header, "User-Agent": "qwen3vl",
                                                  "Accept-Encoding": "identity", "Connection": "close"})
        response = conn.getresponse()
        if response.status in REDIRECTS:
            return response.status, response.getheader("Location"), b""
        if not 200 <= response.status < 300:
            raise MediaFetchError(f"HTTP {response.status} {response.reason}", **err)
        body = _read_body(response, limits, err)
        if watchdog.fired:  # the shut-down socket read as an early end of the body
            raise MediaLimitError(f"fetch outlasted the deadline ({until.name})", **err)
        if response.length:  # http.client's count of Content-Length bytes still missing
            raise MediaFetchError(f"could not fetch URL: connection closed {response.length} bytes early", **err)
        return response.status, None, body
    except MediaError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if (watchdog is not None and watchdog.fired) or until.left() <= 0:
            raise MediaLimitError(f"fetch outlasted the deadline ({until.name})", **err) from None
        if isinstance(exc, (socket.timeout, TimeoutError)):
            raise MediaFetchError(f"could not fetch URL: no data for {read_timeout:g} s (read_timeout_s)",
                                  **err) from None
        raise MediaFetchError(f"could not fetch URL: {exc}", **err) from None
    finally:
        if watchdog is not None:
            watchdog.close()
        if sock is not None:
            sock.close()


def _read_body(response: http.client.HTTPResponse, limits: MediaLimits, err: dict) -> bytes:
    cap = limits.max_download_bytes
    length = (response.getheader("Content-Length") or "").strip()
    if length.isdigit() and int(length) > cap:
        raise MediaLimitError(f"Content-Length {length} is over max_download_bytes={cap}", **err)
    chunks, size = [], 0
    while chunk := response.read1(CHUNK):
        size += len(chunk)
        if size > cap:
            raise MediaLimitError(f"download is over max_download_bytes={cap}", **err)
        chunks.append(chunk)
    return b"".join(chunks)


def _short(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


__all__ = ["fetch_bytes_or_path", "fetch_url", "check_url", "address_problem", "host_allowed", "Deadline"]
