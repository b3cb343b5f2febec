"""``qwen3vl chat``: a Thinking model's reasoning printed before the answer (``--hide-reasoning``
leaves it out) and ``--boxes OUT.png`` (the answer's boxes and points drawn on the image)."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import fresh_home
from qwen3vl.cli_output import DIM, RESET, ReplyPrinter, boxes_message, save_boxes
from qwen3vl.demo import demo_checkpoint
from qwen3vl.engine.request import Delta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THINKING_TEMPLATE = os.path.join(ROOT, "tests", "fixtures", "qwen3vl-configs", "Qwen3-VL-Thinking",
                                 "chat_template.jinja")
GROUNDED = ('Here they are:\n```json\n[\n  {"bbox_2d": [100, 200, 500, 800], "label": "cat"},\n'
            '  {"point_2d": [750, 250], "label": "eye"}\n]\n```\nAnything else?')


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return fresh_home(tmp_path_factory)


@pytest.fixture(scope="module")
def thinking_model(home, tmp_path_factory):
    """The demo checkpoint with the Thinking chat template: its (random) output is all reasoning."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QWEN3VL_HOME", home)
        src = demo_checkpoint()
    dst = str(tmp_path_factory.mktemp("thinking") / "ckpt")
    shutil.copytree(src, dst)
    shutil.copyfile(THINKING_TEMPLATE, os.path.join(dst, "chat_template.jinja"))
    return dst


def run_cli(args, home):
    env = dict(os.environ, QWEN3VL_HOME=home)
    return subprocess.run([sys.executable, "-m", "qwen3vl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_reply_printer_dims_reasoning_on_a_terminal_and_can_hide_it():
    deltas = [Delta("", [], reasoning="Let me "), Delta("", [], reasoning="look."), Delta("A cat", []),
              Delta(".", [])]
    out = io.StringIO()
    printer = ReplyPrinter(out, dim=True)
    for d in deltas:
        printer.write(d)
    printer.finish()
    assert out.getvalue() == f"{DIM}Let me look.{RESET}\n\nA cat.\n"
    plain = io.StringIO()
    printer = ReplyPrinter(plain)
    for d in deltas:
        printer.write(d)
    printer.finish()
    assert plain.getvalue() == "Let me look.\n\nA cat.\n" and "\x1b" not in plain.getvalue()
    hidden = io.StringIO()
    printer = ReplyPrinter(hidden, show_reasoning=False, dim=True)
    for d in deltas:
        printer.write(d)
    printer.finish()
    assert hidden.getvalue() == "A cat.\n"
    cut = io.StringIO()  # cut short while thinking: the dim is still closed
    printer = ReplyPrinter(cut, dim=True)
    printer.write(deltas[0])
    printer.finish()
    assert cut.getvalue() == f"{DIM}Let me {RESET}\n"


def test_save_boxes_draws_on_the_original_image(tmp_path):
    src, out = tmp_path / "white.png", tmp_path / "boxes.png"
    Image.new("RGB", (400, 300), "white").save(src)
    assert save_boxes(str(src), GROUNDED, str(out)) == 2
    with Image.open(out) as drawn:
        assert drawn.size == (400, 300)
        pixels = drawn.convert("RGB")
        # the box spans x 40..200, y 60..240: its left edge is coloured, its inside and far corner are not
        assert pixels.getpixel((40, 150)) != (255, 255, 255)
        assert pixels.getpixel((120, 150)) == (255, 255, 255)
        assert pixels.getpixel((390, 290)) == (255, 255, 255)
        assert pixels.getpixel((300, 75)) != (255, 255, 255)  # the point at (750, 250) -> (300, 75)
    assert boxes_message(2, str(out)).startswith("[2 ") and str(out) in boxes_message(2, str(out))
    none = tmp_path / "none.png"
    assert save_boxes(str(src), "No objects here.", str(none)) == 0 and not none.exists()
    assert "no boxes or points found" in boxes_message(0, str(none))


def test_cli_boxes_on_the_demo_says_none_found(home, tmp_path):
    img, out = tmp_path / "red.png", tmp_path / "out.png"
    Image.new("RGB", (40, 50), (255, 0, 0)).save(img)
    p = run_cli(["chat", "--max-new-tokens", "6", "--temperature", "0", "--image", str(img), "--boxes", str(out),
                 "--hide-reasoning", "Find", "it."], home)
    assert p.returncode == 0, p.stderr
    assert "no boxes or points found" in p.stdout and not out.exists()
    bad = run_cli(["chat", "--boxes", str(out), "hi"], home)
    assert bad.returncode == 2 and "--boxes needs an --image" in bad.stderr


def test_cli_prints_a_thinking_models_reasoning_unless_hidden(thinking_model, home):
    import qwen3vl

    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    expected = qwen3vl.LLM(thinking_model).chat(msgs, max_tokens=8, temperature=0)
    assert expected.reasoning.strip() and expected.text == ""  # 8 random tokens never close the reasoning
    args = ["chat", "--model", thinking_model, "--max-new-tokens", "8", "--temperature", "0"]
    shown = run_cli([*args, "hi"], home)
    assert shown.returncode == 0, shown.stderr
    assert expected.reasoning in shown.stdout
    assert "\x1b" not in shown.stdout  # not a terminal: no colour codes
    hidden = run_cli([*args, "--hide-reasoning", "hi"], home)
    assert hidden.returncode == 0, hidden.stderr
    assert expected.reasoning.strip() not in hidden.stdout and hidden.stdout.strip() == ""
