"""Fuzzing the HTTP API from its own OpenAPI description (``GET /openapi.json``) with hypothesis:
request bodies generated from the schemas (valid-ish), the same with one field swapped for any
JSON, arbitrary JSON and bytes, odd content types, Host headers, methods and paths, strings with
lone surrogates. Whatever comes in, the server must answer below 500, errors as OpenAI-style
JSON, and stay healthy. A demo server with a 256-token context keeps each generation short.
"""
from __future__ import annotations

import base64
import json
import os
from collections import Counter

import pytest

from test_server import ServerProcess, home, png_bytes  # noqa: F401

hypothesis = pytest.importorskip("hypothesis")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("QWEN3VL_FUZZ_EXAMPLES", "120"))  # CI: ~40 s; raise it for a longer hunt
STATUSES: Counter = Counter()
TINY_PNG = "data:image/png;base64," + base64.b64encode(png_bytes(32, 32)).decode()
SOURCES = [TINY_PNG, "data:image/png;base64,AAAA", "http://127.0.0.1:1/x.png", "file:///etc/passwd", "x.png", ""]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
SURROGATE_TEXT = st.lists(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(),
                          min_size=1, max_size=6).map("".join)


@pytest.fixture(scope="module")
def server(home):  # noqa: F811
    srv = ServerProcess(home, "--max-model-len", "256")
    srv.doc = httpx.get(srv.url + "/openapi.json", timeout=10).json()
    yield srv
    srv.stop()


# ---------------------------------------------------------------------------- schema -> strategy
def _resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _string(schema: dict, name: str):
    if name in ("url", "image", "video"):
        return st.sampled_from(SOURCES)
    if name == "model":
        return st.just("qwen3vl-demo") | st.text(max_size=10)
    return st.text(max_size=min(schema.get("maxLength", 40), 40))


def _number(schema: dict, integer: bool):
    low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum")
    if integer:
        return st.integers(low, high)
    return st.floats(low, high, allow_nan=False, allow_infinity=False,
                     exclude_min="exclusiveMinimum" in schema) | st.integers(
        None if low is None else int(low) + 1, None if high is None else int(high))


def strategy(doc: dict, schema: dict, name: str = ""):
    """Values matching an OpenAPI schema (the subset openapi.py uses), kept small."""
    schema = _resolve(doc, schema)
    if "oneOf" in schema:
        return st.one_of([strategy(doc, s, name) for s in schema["oneOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        return st.one_of([strategy(doc, {**schema, "type": k}, name) for k in kind])
    if kind == "object":
        props = {k: strategy(doc, v, k) for k, v in schema.get("properties", {}).items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                     optional={k: v for k, v in props.items() if k not in required})
    if kind == "array":
        return st.lists(strategy(doc, schema.get("items", {}), name), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 3), 3))
    return {"string": lambda: _string(schema, name), "integer": lambda: _number(schema, True),
            "number": lambda: _number(schema, False), "boolean": st.booleans, "null": st.none}[kind]()


def _short_generation(body: dict, budget: int) -> dict:
    """Valid-ish bodies generate at most a few tokens (the fuzz budget is seconds, not minutes)."""
    body = dict(body)
    body.pop("max_completion_tokens", None)
    body["max_tokens"] = budget
    if isinstance(body.get("min_tokens"), int) and body["min_tokens"] > 8:
        body["min_tokens"] = 8
    return body


@st.composite
def requests(draw, doc: dict):
    """(method, path, headers, content) of one request: mostly valid-ish bodies; otherwise one thing
    at a time is off (a field, the whole body, the content type, the Host, the method or path)."""
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body = draw(st.tuples(strategy(doc, schema), st.integers(1, 8)).map(lambda t: _short_generation(*t)))
    method, headers, mode = "POST", {"Content-Type": "application/json"}, draw(st.integers(0, 9))
    content = json.dumps(body).encode()  # ensure_ascii: lone surrogates become \udXXX escapes
    if mode in (5, 6):
        key = draw(st.sampled_from(sorted(_resolve(doc, schema)["properties"])) | st.text(max_size=10))
        content = json.dumps({**body, key: draw(JSON | SURROGATE_TEXT)}).encode()
    elif mode == 7:
        content = draw(JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64) | st.sampled_from(
            [b"NaN", b"[" * 200, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b"\xff\xfe{}"]))
    elif mode == 8:
        headers = draw(st.sampled_from([{}, {"Content-Type": "text/plain"}, {"Content-Type": "\x7f;;="},
                                        {"Content-Type": "application/json; charset=utf-16"},
                                        {"Content-Type": "application/x-www-form-urlencoded"}]))
    elif mode == 9:
        headers["Host"] = draw(st.sampled_from(["localhost", "evil.example", "[::1]:1", "", "a:b:c", "127.0.0.1."]))
        headers["Authorization"] = "Bearer " + draw(st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                                            min_size=1, max_size=30))
        method = draw(st.sampled_from(["POST", "GET", "PUT", "OPTIONS", "DELETE"]))
        path = draw(st.sampled_from([path, "/", "/health", "/v1/models", "/openapi.json", "/v1/../health", "/%ff"]))
    return method, path, headers, content


# ---------------------------------------------------------------------------- the fuzz run
def _check(server, method: str, path: str, headers: dict, content: bytes) -> None:
    with httpx.Client(timeout=60) as http:
        with http.stream(method, server.url + path, headers=headers, content=content) as resp:
            text = resp.read().decode("utf-8", "replace")
    STATUSES[resp.status_code] += 1
    assert resp.status_code < 500, (method, path, headers, content[:300], resp.status_code, text[:500])
    assert "Traceback" not in text
    if resp.status_code >= 400 and resp.headers.get("content-type", "").startswith("application/json"):
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        assert '"server_error"' not in text and text.rstrip().endswith("data: [DONE]"), text[-300:]


def test_fuzz_api_from_openapi(server):
    doc = server.doc
    assert set(doc["paths"]) >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(requests(doc))
    def run(request):
        _check(server, *request)

    run()
    print(f"\nstatuses over {sum(STATUSES.values())} requests: {dict(sorted(STATUSES.items()))}")
    assert STATUSES[200] and STATUSES[400]  # the fuzz reached generation as well as validation
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["running"] == 0
    assert "Traceback" not in server.output(), server.output()[-3000:]
