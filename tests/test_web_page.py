"""The web chat page in headless Chromium (Debian's chromium, driven by Playwright's Python
package): load ``/``, attach an image, ask, and see a streamed answer with its token usage; a
Thinking model's reasoning and a grounding answer's boxes (canned replies: the demo's random
weights produce neither).

Skips (with the reason) only when no Chromium or no Playwright package is installed; install
both with ``scripts/setup_browser.sh``.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from conftest import fresh_home
from test_server import ServerProcess, png_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    for path in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium not found (install it with scripts/setup_browser.sh: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                   "(scripts/setup_browser.sh installs it)")
    profile = str(tmp_path_factory.mktemp("chromium_profile"))
    with sync_api.sync_playwright() as pw:
        # A persistent context is how Playwright takes a fresh --user-data-dir of our own.
        context = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                        args=CHROMIUM_FLAGS, viewport={"width": 1100, "height": 800})
        try:
            yield context.new_page()
        finally:
            context.close()


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    home = fresh_home(tmp_path_factory)
    srv = ServerProcess(home, "--max-model-len", "2048")
    yield srv
    srv.stop()


def test_chat_page_image_question_answer(browser_page, web_server, tmp_path):
    page = browser_page
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(web_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('qwen3vl-demo')", timeout=10000)
    assert page.locator("#demo").is_visible()  # random weights are labelled as such

    image = tmp_path / "red.png"
    image.write_bytes(png_bytes(96, 64))
    page.fill("#max-tokens", "24")
    page.fill("#temperature", "0")  # greedy: the same answer every run
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector("#attachments .att img")
    page.fill("#prompt", "What colour is this picture?")
    page.click("#send")

    answer = page.locator(".msg.assistant").last
    answer.locator(".usage").wait_for(timeout=30000)
    page.wait_for_function("document.body.dataset.busy === '0'", timeout=30000)
    assert page.locator(".msg.user .media img").count() == 1
    assert "What colour" in page.locator(".msg.user").last.inner_text()
    text = answer.locator(".text").inner_text()
    usage = answer.locator(".usage").inner_text()
    assert answer.locator(".error").count() == 0
    assert text.strip(), "no answer text appeared"
    assert "prompt" in usage and "completion" in usage

    # A second turn goes out with the whole conversation (multi-turn).
    page.fill("#prompt", "And now?")
    page.press("#prompt", "Enter")  # Enter sends
    page.locator(".msg.assistant").nth(1).locator(".usage").wait_for(timeout=30000)
    first_prompt = int(usage.split()[1])
    second_prompt = int(page.locator(".msg.assistant").nth(1).locator(".usage").inner_text().split()[1])
    assert second_prompt > first_prompt
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "web_chat.png"), full_page=True)
    assert not errors, errors


REASONING = ["The user wants the cat. ", "It sits on the left; its eye is top right."]
GROUNDED = ('Found them:\n```json\n[\n  {"bbox_2d": [100, 200, 500, 800], "label": "cat"},\n'
            '  {"point_2d": [750, 250], "label": "eye"}\n]\n```\nAnything else?')


def sse(reasoning: list[str], answer: list[str]) -> str:
    """A canned chat.completion.chunk stream, as the server sends it (reasoning under both names)."""
    chunks = [{"reasoning_content": r, "reasoning": r} for r in reasoning] + [{"content": a} for a in answer]
    events = [{"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "qwen3vl-demo",
               "choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in chunks]
    events.append({"id": "chatcmpl-test", "object": "chat.completion.chunk", "choices": [],
                   "usage": {"prompt_tokens": 50, "completion_tokens": 30, "total_tokens": 80}})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def open_page(page, server) -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('qwen3vl-demo')", timeout=10000)
    return errors


def test_reasoning_and_boxes_from_a_canned_stream(browser_page, web_server, tmp_path):
    page = browser_page
    errors = open_page(page, web_server)
    replies = [sse(REASONING, [GROUNDED[:30], GROUNDED[30:]]), sse([], ["You are welcome."])]
    bodies: list[dict] = []

    def reply(route):
        bodies.append(route.request.post_data_json)
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=replies[len(bodies) - 1])

    page.route("**/v1/chat/completions", reply)
    try:
        image = tmp_path / "red.png"
        image.write_bytes(png_bytes(400, 300))
        page.set_input_files("#file-input", str(image))
        page.wait_for_selector("#attachments .att img")
        page.fill("#prompt", "Where is the cat? Point at its eye.")
        page.click("#send")
        answer = page.locator(".msg.assistant").last
        answer.locator(".grounding svg .item").nth(1).wait_for(timeout=10000)
        page.wait_for_function("document.body.dataset.busy === '0'", timeout=10000)

        thinking = answer.locator(".thinking")
        assert thinking.locator(".reasoning").text_content() == "".join(REASONING)
        assert re.fullmatch(r"Thought for \d+\.\d s", thinking.locator("summary").inner_text())
        assert not thinking.evaluate("d => d.open")  # collapsed once the answer started
        assert answer.locator(".text").inner_text() == GROUNDED
        # the box and the point over a 400x300 copy: 0-1000 coordinates / 1000 x the natural size
        svg = answer.locator(".grounding svg")
        assert svg.get_attribute("viewBox") == "0 0 400 300"
        rect, circle = svg.locator("rect"), svg.locator("circle")
        assert rect.count() == 1 and circle.count() == 1
        assert [rect.get_attribute(a) for a in ("x", "y", "width", "height")] == ["40", "60", "160", "180"]
        assert [circle.get_attribute(a) for a in ("cx", "cy")] == ["300", "75"]
        assert svg.locator("text").all_text_contents() == ["cat", "eye"]
        assert answer.locator(".grounding img").evaluate("i => i.naturalWidth") == 400
        assert "1 box, 1 point" in answer.locator(".grounding figcaption").inner_text()

        # The next turn sends the answer back without its reasoning; a reply without any has no block.
        page.fill("#prompt", "Thanks!")
        page.press("#prompt", "Enter")
        second = page.locator(".msg.assistant").nth(1)
        second.locator(".usage").wait_for(timeout=10000)
        page.wait_for_function("document.body.dataset.busy === '0'", timeout=10000)
        assert bodies[1]["messages"][1] == {"role": "assistant", "content": GROUNDED}
        assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
        assert second.locator(".thinking").count() == 0 and second.locator(".grounding").count() == 0
        os.makedirs(ARTIFACTS, exist_ok=True)
        page.screenshot(path=os.path.join(ARTIFACTS, "web_chat_grounding.png"), full_page=True)
    finally:
        page.unroute("**/v1/chat/completions")
    assert not errors, errors


# fetch() of the chat endpoint answered by a stream the test writes to piece by piece.
STREAM_DOUBLE = """() => {
  const encoder = new TextEncoder();
  const realFetch = window.fetch;
  window.fetch = (url, options) => {
    if (url !== "/v1/chat/completions") return realFetch(url, options);
    const body = new ReadableStream({ start(c) { window.__stream = c; } });
    return Promise.resolve(new Response(body, { headers: { "Content-Type": "text/event-stream" } }));
  };
  window.__push = (text) => window.__stream.enqueue(encoder.encode(text));
}"""


def test_thinking_block_is_open_while_thinking_then_collapses(browser_page, web_server):
    page = browser_page
    errors = open_page(page, web_server)
    page.evaluate(STREAM_DOUBLE)
    page.fill("#prompt", "Think first.")
    page.click("#send")
    thinking = page.locator(".msg.assistant .thinking")
    page.wait_for_function("window.__stream !== undefined", timeout=10000)
    events = sse(REASONING, ["The answer."]).split("\n\n")
    page.evaluate("t => window.__push(t)", events[0] + "\n\n")
    thinking.locator(".reasoning").wait_for(timeout=10000)
    assert thinking.evaluate("d => d.open") and thinking.locator("summary").inner_text().startswith("Thinking")
    page.wait_for_timeout(400)
    page.evaluate("t => window.__push(t)", events[1] + "\n\n")
    page.wait_for_function("document.querySelector('.thinking .reasoning').textContent.includes('eye')")
    assert thinking.evaluate("d => d.open")
    page.evaluate("t => window.__push(t)", "\n\n".join(events[2:]))
    page.wait_for_function("document.body.dataset.busy === '0'", timeout=10000)
    summary = thinking.locator("summary").inner_text()
    assert re.fullmatch(r"Thought for \d+\.\d s", summary) and float(summary.split()[2]) >= 0.3
    assert not thinking.evaluate("d => d.open")
    assert page.locator(".msg.assistant .text").inner_text() == "The answer."
    assert not errors, errors
