"""Reading a request body into JSON without letting the client choose the cost.

Checked in this order, each before the step it protects:

* ``Content-Type`` must be ``application/json`` (415): a web page can POST ``text/plain`` or a
  form to any address without a CORS preflight, never JSON, so this alone keeps other sites'
  pages from driving a local server.
* ``Content-Length`` and then the bytes received against ``--max-body-mb`` (413).
* the body's shape on the raw bytes (no recursion, C-speed scans): at most ``MAX_JSON_VALUES``
  values and ``MAX_JSON_DEPTH`` levels of nesting. ``json.loads`` recurses per level and builds
  one object per value: ``[[[...]]]`` five thousand deep or 30 MB of ``{},`` would otherwise
  cost a RecursionError or gigabytes.
* strict UTF-8, then ``json.loads`` refusing ``NaN`` / ``Infinity`` (and numbers that overflow
  to them, such as ``1e999``), which are not JSON.
* no lone UTF-16 surrogate (``"\\ud800"``) in any string or key: they cannot be encoded, so the
  tokenizer, the log or the error renderer would fail on them later.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
from fastapi import Request as HTTPRequest

from .errors import ProtocolError

MAX_JSON_DEPTH = 64
MAX_JSON_VALUES = 100_000
SCAN_BLOCK = 1 << 20
QUOTE, OPEN, CLOSE, COMMA = 1, 2, 3, 4
_CLASS = np.zeros(256, dtype=np.uint8)  # byte -> what it is to the shape scan (0: nothing)
_CLASS[ord('"')] = QUOTE
_CLASS[[ord("["), ord("{")]] = OPEN
_CLASS[[ord("]"), ord("}")]] = CLOSE
_CLASS[ord(",")] = COMMA
_NOT_STRUCTURAL = bytes(b for b in range(256) if not _CLASS[b])
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_content_type(http: HTTPRequest) -> None:
    given = http.headers.get("content-type", "")
    media_type, *params = [p.strip().lower() for p in given.split(";")]
    charset = next((p.split("=", 1)[1].strip('"') for p in params if p.startswith("charset=")), "utf-8")
    if media_type != "application/json" or charset not in ("utf-8", "utf8"):
        raise ProtocolError(f"the request body must be JSON sent with 'Content-Type: application/json' "
                            f"(got {given[:100]!r})", status=415, code="unsupported_media_type")


async def read_body(http: HTTPRequest, max_bytes: int) -> bytes:
    """The request's body, if it is declared JSON and within ``max_bytes`` (raises ``ProtocolError``)."""
    check_content_type(http)
    too_large = ProtocolError(f"the request body is larger than {max_bytes / (1 << 20):g} MiB (the server's "
                              "--max-body-mb)", status=413, code="request_too_large")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 18 or int(declared) > max_bytes):  # (int() of 5,000 digits raises)
        raise too_large
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """A body as JSON, checked as the module docstring says (CPU-bound: run it off the event loop)."""
    check_shape(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except ProtocolError:
        raise
    except RecursionError:  # check_shape keeps bodies this deep out; kept as the last line of defence
        raise ProtocolError(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError, and integers too long to convert
        raise ProtocolError(f"the request body is not valid JSON: {e}") from None
    check_strings(value)
    return value


def check_shape(raw: bytes) -> None:
    """Bound the number of values and the nesting depth of a JSON text before parsing it."""
    opens = raw.count(b"[") + raw.count(b"{")
    if opens <= MAX_JSON_DEPTH and opens + raw.count(b",") < MAX_JSON_VALUES:
        return  # brackets and commas inside strings counted too: upper bounds, nothing more to do
    # Escaped backslashes first, then escaped quotes (bytes.replace goes left to right as a JSON
    # reader does): every quote left opens or closes a string. Then only quotes, brackets and
    # commas are kept (one C-speed pass; a base64 payload has none of them).
    skeleton = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURAL)
    values, depth, deepest, in_string = 1, 0, 0, 0
    for start in range(0, len(skeleton), SCAN_BLOCK):  # in blocks: scratch memory stays a few MB
        codes = _CLASS[np.frombuffer(skeleton, dtype=np.uint8, count=min(SCAN_BLOCK, len(skeleton) - start),
                                     offset=start)]
        # parity of the quotes so far: 1 inside a string (uint8 sums wrap, their parity does not)
        inside = (np.cumsum(codes == QUOTE, dtype=np.uint8) + in_string) & 1
        in_string = int(inside[-1])
        up, down = (inside == 0) & (codes == OPEN), (inside == 0) & (codes == CLOSE)
        values += int(np.count_nonzero(up)) + int(np.count_nonzero((inside == 0) & (codes == COMMA)))
        if values > MAX_JSON_VALUES:
            raise ProtocolError(f"the request body holds more than {MAX_JSON_VALUES} JSON values")
        levels = depth + np.cumsum(up.astype(np.int32) - down)
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        if deepest > MAX_JSON_DEPTH:
            raise ProtocolError(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")


def _refuse_constant(name: str):
    raise ProtocolError(f"the request body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"the request body is not valid JSON: {text[:40]} is out of range for a number")
    return value


def check_strings(value: Any) -> None:
    """Refuse lone surrogates in any string or key, naming where (e.g. ``messages[0].content``).

    Iterative: the depth is already bounded, but the walk must not depend on that."""
    stack: list[tuple[Any, tuple | None]] = [(value, None)]  # (value, its path as a linked list)
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                raise _surrogate_error(path)
        elif isinstance(item, dict):
            for key, child in item.items():
                where = (path, key)
                if not key.isascii() and _SURROGATE.search(key):
                    raise _surrogate_error(where)
                stack.append((child, where))
        elif isinstance(item, list):
            stack.extend((child, (path, i)) for i, child in enumerate(item))


def _surrogate_error(path: tuple | None) -> ProtocolError:
    parts = []
    while path is not None:
        path, key = path
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    param = "".join(reversed(parts)).lstrip(".") or None
    where = f"'{param}'" if param else "the request body"
    return ProtocolError(f"{where} contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape): "
                         "send valid Unicode text", param)
