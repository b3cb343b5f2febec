"""The web chat page in headless Chromium (Debian's chromium, driven by Playwright's Python
package): load ``/``, attach an image, ask, and see a streamed answer with its token usage.

Skips (with the reason) only when no Chromium or no Playwright package is installed; install
both with ``scripts/setup_browser.sh``.
"""
from __future__ import annotations

import os
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
