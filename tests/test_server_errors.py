"""The HTTP server's error paths: OpenAI error bodies for bad requests (a real ``qwen3vl serve``
subprocess, see test_server.py), API keys, the local media policy, and the mapping of the
engine's typed errors (in process)."""
from __future__ import annotations

import os

import pytest

from test_server import (MODEL_NAME, _ask, _assert_error, _post, home, keyed_server, media_dir,  # noqa: F401
                         png_bytes, processor, prompt_tokens, server)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


# ---------------------------------------------------------------------------- errors
BAD_REQUESTS = [
    ("bad json", b"{not json", 400, None),
    ("body not an object", [1, 2], 400, None),
    ("no messages", {"model": MODEL_NAME}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("content wrong type", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("unknown part", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
     "messages[0].content[0].type"),
    ("temperature wrong type", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature"),
    ("negative temperature", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400,
     "temperature"),
    ("top_p zero", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("max_tokens zero", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("n zero", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ("stop wrong type", {"messages": [{"role": "user", "content": "hi"}], "stop": 3}, 400, "stop"),
    ("unreadable image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAAAAAA"}}]}]}, 400, "messages"),
    ("unreadable video", {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAAAAA"}}]}]}, 400, "messages"),
    ("placeholder in text", {"messages": [{"role": "user", "content": "<|image_pad|>"}]}, 400, None),
    ("unknown mm option", {"messages": [{"role": "user", "content": "hi"}],
                           "mm_processor_kwargs": {"colour": 1}}, 400, "mm_processor_kwargs.colour"),
    ("prompt too long", {"messages": [{"role": "user", "content": "word " * 4500}]}, 400, "messages"),
    ("completion too long", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400,
     "max_tokens"),
    ("min_tokens above max_tokens", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                     "min_tokens": 5}, 400, "min_tokens"),
    ("unknown model", {"model": "gpt-7", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("ftp url", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}]}]}, 400,
     "messages[0].content[0].image_url.url"),
    ("image url wrong type", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": 5}}]}]}, 400, "messages[0].content[0].image_url.url"),
]


@pytest.mark.parametrize("name,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server, name, body, status, param):
    _assert_error(_post(server.url + "/v1/chat/completions", body), status, param)
    assert server.health()["status"] == "ok"


def test_bad_requests_leave_server_healthy(server):
    for route in ("/v1/nothing", "/favicon.ico"):
        _assert_error(httpx.get(server.url + route), 404)
    _assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    err = _assert_error(_post(server.url + "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "x " * 4500}]}), 400)
    assert err["code"] == "context_length_exceeded"
    _assert_error(_post(server.url + "/v1/completions", {"prompt": ""}), 400, "prompt")
    err = _assert_error(_post(server.url + "/v1/completions", {"prompt": "x " * 4500}), 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:  # the SDK understands our error bodies
        server.client().chat.completions.create(model=MODEL_NAME, messages=[], max_tokens=2)
    assert info.value.body["param"] == "messages"
    health = server.health()
    assert health["running"] == 0 and health["waiting"] == 0
    assert _ask(server.client(), 2)


def test_api_key_required(keyed_server):
    url = keyed_server.url + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    _assert_error(_post(url, body), 401)
    _assert_error(_post(url, body, {"Authorization": "Bearer wrong"}), 401)
    _assert_error(httpx.get(keyed_server.url + "/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client("wrong").models.list()
    resp = keyed_server.client("sesame").chat.completions.create(model="qwen3vl-demo", **body)
    assert resp.choices[0].message.role == "assistant"
    assert keyed_server.health()["status"] == "ok"  # the health probe needs no key


@pytest.mark.parametrize("source", ["file:///etc/passwd", "/etc/passwd", "../../etc/passwd"])
def test_local_media_refused_by_default(keyed_server, source):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": source}}]}]}
    err = _assert_error(_post(keyed_server.url + "/v1/chat/completions", body,
                              {"Authorization": "Bearer sesame"}), 400)
    assert err["code"] == "local_media_refused"


def test_allowed_local_media_path(server, media_dir, tmp_path, processor):
    inside = os.path.join(media_dir, "red.png")
    with open(inside, "wb") as f:
        f.write(png_bytes(64, 64))
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes(64, 64))
    link = os.path.join(media_dir, "link.png")
    if not os.path.islink(link):
        os.symlink(outside, link)
    client = server.client()
    for source in (inside, "file://" + inside, "red.png"):  # relative paths are inside the folder
        resp = client.chat.completions.create(model=MODEL_NAME, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": source}}]}])
        assert resp.usage.prompt_tokens == prompt_tokens(processor, [
            {"role": "user", "content": [{"type": "image", "image": inside}]}])
    for source in (str(outside), "file://" + str(outside), link, os.path.join(media_dir, "..", outside.name)):
        body = {"messages": [{"role": "user", "content": [{"type": "image", "image": source}]}]}
        err = _assert_error(_post(server.url + "/v1/chat/completions", body), 400)
        assert err["code"] == "local_media_refused", source


def test_internal_errors_are_json_without_traceback(home):
    """A failure inside the server becomes a plain JSON 500 (in-process app over a broken engine)."""
    from fastapi.testclient import TestClient

    from qwen3vl.server import ServeSettings
    from qwen3vl.server.app import create_app

    class BrokenEngine:
        max_model_len = 16
        max_num_seqs = 1

        def stats(self):
            raise RuntimeError("engine exploded\nTraceback: secret")

    class BrokenLLM:
        is_demo, thinking = True, False
        engine = BrokenEngine()

    settings = ServeSettings(served_model_name="x", allowed_hosts=("testserver",))
    with TestClient(create_app(BrokenLLM(), settings), raise_server_exceptions=False) as http:
        resp = http.get("/health")
        assert resp.status_code == 500
        assert resp.json()["error"]["type"] == "server_error"
        assert "secret" not in resp.text and "Traceback" not in resp.text
        assert http.get("/").status_code == 200


# ---------------------------------------------------------------------------- in process
def test_engine_errors_map_to_openai_errors_by_type():
    from qwen3vl.engine.api import InvalidParameter, PromptTooLong, SamplingParams
    from qwen3vl.processor.errors import MediaDecodeError
    from qwen3vl.server.errors import as_protocol_error, engine_error_body
    from qwen3vl.server.protocol import FIELD_NAMES

    def invalid(**kw) -> InvalidParameter:
        with pytest.raises(InvalidParameter) as info:
            SamplingParams(**kw)
        return info.value

    err = as_protocol_error(invalid(max_new_tokens=0), "messages", FIELD_NAMES)
    assert (err.param, err.message, err.status) == ("max_tokens", "max_tokens must be an int >= 1, got 0", 400)
    err = as_protocol_error(invalid(max_new_tokens=2, min_new_tokens=5), "messages", FIELD_NAMES)
    assert (err.param, err.message) == ("min_tokens", "min_tokens must be an int in [0, max_tokens=2], got 5")
    assert as_protocol_error(invalid(top_p=0), "messages", FIELD_NAMES).param == "top_p"
    err = as_protocol_error(PromptTooLong(50, 32), "prompt", FIELD_NAMES)
    assert (err.param, err.code) == ("prompt", "context_length_exceeded")
    assert err.message == "prompt has 50 tokens; the maximum model length is 32"
    err = as_protocol_error(MediaDecodeError("not a readable image", kind="image", index=0), "messages", FIELD_NAMES)
    assert err.param == "messages" and err.message == "image #0: not a readable image"
    assert as_protocol_error(ValueError("odd"), "messages", FIELD_NAMES).param is None
    status, body = engine_error_body(PromptTooLong(9, 8))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = engine_error_body(RuntimeError("secret detail"))
    assert status == 500 and body["error"]["type"] == "server_error" and "secret" not in str(body)


def test_serve_settings_from_cli_arguments(tmp_path):
    from qwen3vl import cli
    from qwen3vl.server import ServeSettings

    args = cli.build_parser().parse_args(["serve", "--model", str(tmp_path), "--port", "0", "--api-key", "k",
                                          "--max-num-seqs", "3", "--allowed-local-media-path", str(tmp_path)])
    settings = cli.serve_settings(args)
    assert settings == ServeSettings(model=str(tmp_path), port=0, api_key="k", max_num_seqs=3,
                                     allowed_local_media_path=str(tmp_path))
    assert settings.model_name == tmp_path.name and settings.aliases == {str(tmp_path)}
    assert ServeSettings().model_name == "qwen3vl-demo" and ServeSettings(served_model_name="x").model_name == "x"
    for bad in (dict(port=70000), dict(max_num_seqs=0), dict(max_model_len=1),
                dict(allowed_local_media_path=str(tmp_path / "missing"))):
        with pytest.raises(ValueError):
            ServeSettings(**bad)
    with pytest.raises(Exception):  # frozen
        settings.port = 1
