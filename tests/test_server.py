"""The HTTP server end to end: a real ``qwen3vl serve`` subprocess on the tiny demo checkpoint,
driven with the official ``openai`` client (success paths) and raw HTTP (error paths)."""
from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import fresh_home, home_env

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = "tiny-vl"


# ---------------------------------------------------------------------------- server process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m qwen3vl.cli serve`` on a free loopback port; its log goes to a file (a full
    pipe would stall the server)."""

    def __init__(self, home: str, *args: str, timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(home, f"server-{self.port}.log")
        env = {**os.environ, "QWEN3VL_HOME": home, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "qwen3vl.cli", "serve", "--port", str(self.port), *args]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def health(self) -> dict:
        r = httpx.get(self.url + "/health", timeout=5)
        assert r.status_code == 200
        return r.json()

    def client(self, api_key: str = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh QWEN3VL_HOME holding the demo checkpoint (built here once, then shared). The compiled
    kernels are the test session's own (a link to its kernel cache): a fresh home would compile
    them again in each server process, minutes on a busy 2-core machine."""
    from qwen3vl.demo import demo_checkpoint

    with home_env(fresh_home(tmp_path_factory)) as path:
        demo_checkpoint()
        yield path


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("allowed_media"))


@pytest.fixture(scope="module")
def server(home, media_dir):
    srv = ServerProcess(home, "--served-model-name", MODEL_NAME, "--max-num-seqs", "8", "--max-model-len", "4096",
                        "--limit-mm-per-prompt", '{"image": 4, "video": 1}',
                        "--allowed-local-media-path", media_dir,
                        "--allow-private-media")  # test_image_http_url fetches from a loopback server
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_server(home):
    """Default media policy (no local files) and an API key."""
    srv = ServerProcess(home, "--api-key", "sesame", "--max-num-seqs", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def processor(home):
    import qwen3vl
    from qwen3vl.demo import demo_checkpoint

    return qwen3vl.Processor.from_pretrained(demo_checkpoint())


# ---------------------------------------------------------------------------- media helpers
def png_bytes(w: int, h: int, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def mp4_bytes(frames: int = 8, size: int = 64, fps: int = 4) -> bytes:
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), (i * 30) % 256, dtype=np.uint8)
            img[: size // 2, :, 1] = 255 - (i * 30) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _post(url: str, body, headers: dict | None = None) -> httpx.Response:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    headers = {"Content-Type": "application/json", **(headers or {})}  # the server takes JSON only
    return httpx.post(url, headers=headers, timeout=30, **kw)


def _assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in resp.text
    if param is not None:
        assert err["param"] == param, err
    return err


def prompt_tokens(processor, messages: list[dict], **options) -> int:
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt", **options)
    return batch["input_ids"].shape[1]


# ---------------------------------------------------------------------------- success paths
def test_models_lists_served_name(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert server.health()["demo"] is True


def test_image_data_uri_usage_matches_processor(server, processor):
    uri = data_uri(png_bytes(64, 96), "image/png")
    resp = server.client().chat.completions.create(
        model=MODEL_NAME, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                               {"type": "text", "text": "What is this?"}]}])
    assert resp.object == "chat.completion" and resp.model == MODEL_NAME and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    expected = prompt_tokens(processor, [{"role": "user", "content": [{"type": "image", "image": uri},
                                                                      {"type": "text", "text": "What is this?"}]}])
    assert resp.usage.prompt_tokens == expected > 64  # the image alone is at least 64 tokens
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == expected + resp.usage.completion_tokens


def test_multi_image_and_qwen_style_parts(server, processor):
    a, b = data_uri(png_bytes(64, 64), "image/png"), data_uri(png_bytes(320, 128, (0, 90, 200)), "image/png")
    resp = server.client().chat.completions.create(
        model=MODEL_NAME, max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": a}},
                                               {"type": "image", "image": b},
                                               {"type": "text", "text": "Compare them."}]}])
    expected = prompt_tokens(processor, [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": [{"type": "image", "image": a},
                                                                      {"type": "image", "image": b},
                                                                      {"type": "text", "text": "Compare them."}]}])
    assert resp.usage.prompt_tokens == expected


def test_image_http_url(server, processor, tmp_path):
    """Remote images are fetched by the server (here from a loopback HTTP server)."""
    import functools
    import http.server

    (tmp_path / "pic.png").write_bytes(png_bytes(96, 96, (10, 200, 10)))
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/pic.png"
        resp = server.client().chat.completions.create(model=MODEL_NAME, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
        assert resp.usage.prompt_tokens == prompt_tokens(processor, [
            {"role": "user", "content": [{"type": "image", "image": str(tmp_path / "pic.png")}]}])
        err = _assert_error(_post(server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url.replace("pic", "missing")}}]}]}), 400, "messages")
        assert "404" in err["message"]
    finally:
        httpd.shutdown()


def test_video_data_uri_and_mm_processor_kwargs(server, processor):
    uri = data_uri(mp4_bytes(), "video/mp4")
    ours = [{"role": "user", "content": [{"type": "video", "video": uri}, {"type": "text", "text": "What happens?"}]}]
    api = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri}},
                                        {"type": "text", "text": "What happens?"}]}]
    client = server.client()
    resp = client.chat.completions.create(model=MODEL_NAME, max_tokens=4, temperature=0, messages=api)
    assert resp.usage.prompt_tokens == prompt_tokens(processor, ours)
    resp = client.chat.completions.create(model=MODEL_NAME, max_tokens=4, temperature=0, messages=api,
                                          extra_body={"mm_processor_kwargs": {"num_frames": 8}})
    assert resp.usage.prompt_tokens == prompt_tokens(processor, ours, num_frames=8)
    assert prompt_tokens(processor, ours, num_frames=8) > prompt_tokens(processor, ours)


def test_stream_concatenates_to_non_streamed_answer(server):
    client = server.client()
    msgs = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
    full = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, reasons, usage, ids = [], [], None, set()
    for chunk in stream:
        ids.add(chunk.id)
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
        usage = chunk.usage or usage
    assert len(ids) == 1 and len(pieces) > 2
    assert "".join(pieces) == full.choices[0].message.content
    assert [r for r in reasons if r] == [full.choices[0].finish_reason]
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens == full.usage.completion_tokens


def _ask(client, i: int) -> str:
    resp = client.chat.completions.create(model=MODEL_NAME, max_tokens=16, temperature=0,
                                          messages=[{"role": "user", "content": f"Question {i}: " + "why? " * i}])
    return resp.choices[0].message.content


def test_concurrent_greedy_equals_sequential(server):
    client = server.client()
    sequential = [_ask(client, i) for i in range(8)]
    seen_running = []
    stop = threading.Event()

    def watch():  # evidence that the requests really shared the decode batch
        while not stop.is_set():
            seen_running.append(server.health()["running"])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda i: _ask(client, i), range(8)))
    stop.set()
    watcher.join()
    assert concurrent == sequential
    assert len(set(sequential)) > 1
    assert max(seen_running) > 1


def test_completions_endpoint_and_n(server, processor):
    client = server.client()
    prompt = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    resp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, n=2)
    assert resp.object == "text_completion" and len(resp.choices) == 2
    assert resp.choices[0].text == resp.choices[1].text  # greedy choices agree
    assert resp.usage.prompt_tokens == len(processor.tokenizer.encode(prompt))  # no chat template added
    assert 2 <= resp.usage.completion_tokens <= 12  # summed over both choices
    chat = client.chat.completions.create(model=MODEL_NAME, max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": "Hello"}])
    assert chat.choices[0].message.content == resp.choices[0].text  # same prompt once templated
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text


def test_sampling_options_seed_and_stop(server):
    client = server.client()
    msgs = [{"role": "user", "content": "Say something."}]
    kw = dict(model=MODEL_NAME, messages=msgs, max_tokens=12, temperature=1.0, top_p=0.9, seed=7,
              presence_penalty=0.5, frequency_penalty=0.2,
              extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content  # a seed makes sampling repeatable
    two = client.chat.completions.create(**{**kw, "n": 2})
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.prompt_tokens == a.usage.prompt_tokens  # the prompt is counted once
    greedy = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=20, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip()
    cut = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_client_disconnect_frees_slot(server):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Go on forever."}], "stream": True,
            "max_tokens": 4000, "min_tokens": 4000, "temperature": 0}  # ~10 s of work
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [line for _, line in zip(range(12), lines) if line.startswith("data:")]
            assert len(got) >= 3
            assert server.health()["running"] == 1
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 2
    while server.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["running"] == 0, "the slot of a disconnected client was not freed"
    assert _ask(server.client(), 1)  # and the server goes on serving


def test_client_timeout_frees_slot_of_non_streamed_request(server):
    body = {"messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 4000, "min_tokens": 4000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    deadline = time.monotonic() + 2
    while server.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["running"] == 0
