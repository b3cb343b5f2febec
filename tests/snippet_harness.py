"""Runs the official snippets of tests/snippets/ twice, with qwen3vl's imports and with the reference's,
each half in an interpreter of its own (tests/snippet_runner.py), for tests/test_snippets.py.

A snippet file is a header of ``#`` lines (source, substitutions, a marker line) and the snippet,
verbatim. The header's ``#   "OLD" -> NEW  why`` lines are the substitutions the harness makes,
``#   reference half: "OLD" -> NEW`` lines replace them in the reference half only (``NEW`` may name
``{moe}``, ``{dense}``, ``{http}``, ``{media}``, ``{b64_jpeg}``). The qwen3vl half then has
``from transformers import`` -> ``from qwen3vl import`` and ``from qwen_vl_utils import
process_vision_info`` -> ``from qwen3vl import process_vision_info``.

Snippets run in sessions (``SESSIONS``): the README's later blocks use the model and processor of its
first one, as in one Python session; self-contained snippets share an interpreter, each in a namespace
of its own. A step is a snippet or a documented variant of it (``Step.variant``).

Shared by the pytest session: the tiny checkpoints (dense and MoE, released layout, processor files of
Qwen3-VL-8B-Instruct, a greedy generation_config.json: the released one samples, and sampled texts
cannot be compared), the media, a loopback HTTP server, and the runs: every session's two halves
start at once, ``QWEN3VL_SNIPPET_JOBS`` (default 2) interpreters at a time, one thread each.
"""
from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import functools
import http.server
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from fractions import Fraction

import pytest
import torch

from processor_fixtures import build_processor_dir, jpeg_bytes, random_image
from qwen3vl.random_checkpoint import TINY_CONFIG, TINY_MOE_CONFIG, random_tensors, write_checkpoint
from test_processor_dropin import write_noise_video

HERE = os.path.dirname(os.path.abspath(__file__))
SNIPPETS = os.path.join(HERE, "snippets")
RUNNER = os.path.join(HERE, "snippet_runner.py")
MARK = "# ---- snippet (verbatim) ----"
GREEDY = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": False, "eos_token_id": [151645, 151643]}
PARALLEL = int(os.environ.get("QWEN3VL_SNIPPET_JOBS", "2"))
TIMEOUT = 600


def _uncomment_num_frames(code: str) -> str:
    """readme_pixel_fps, variant num_frames128: the commented-out alternative call, uncommented."""
    lines, out, inside = code.split("\n"), [], False
    for line in lines:
        inside = inside or line.startswith("# inputs = processor.apply_chat_template(")
        out.append(line[2:] if inside and line.startswith("# ") else line)
        inside = inside and not line.startswith("# inputs = inputs.to(model.device)")
    assert out != lines, "readme_pixel_fps: the commented-out num_frames=128 call is missing"
    return "\n".join(out)


def _sdpa(code: str) -> str:
    assert '"flash_attention_2"' in code
    return code.replace('"flash_attention_2"', '"sdpa"')


@dataclasses.dataclass(frozen=True)
class Step:
    id: str
    file: str
    variant: object = None      # code -> code, a documented second form of the snippet
    checks: tuple = ("inputs", "pixels", "generation")
    fresh: bool = False         # a new namespace: a standalone snippet sharing an interpreter


SESSIONS = {
    "readme_transformers": (
        Step("readme_chat", "readme_chat"), Step("readme_multi_image", "readme_multi_image"),
        Step("readme_video", "readme_video"), Step("readme_batch", "readme_batch"),
        Step("readme_pixel_budget", "readme_pixel_budget", checks=("inputs",)),
        Step("readme_pixel_fps", "readme_pixel_fps"),
        Step("readme_pixel_fps[num_frames128]", "readme_pixel_fps", _uncomment_num_frames),
        Step("readme_add_vision_id", "readme_add_vision_id", checks=("inputs",))),
    "readme_qwen_vl_utils": (
        Step("readme_qvu_images", "readme_qvu_images"),
        Step("readme_qvu_image_messages", "readme_qvu_image_messages", checks=("inputs",)),
        Step("readme_qvu_calls[image]", "readme_qvu_calls", checks=("inputs", "pixels")),
        Step("readme_qvu_video_messages", "readme_qvu_video_messages", checks=("inputs",)),
        Step("readme_qvu_calls[video]", "readme_qvu_calls", checks=("inputs", "pixels")),
        Step("readme_qvu_videos", "readme_qvu_videos")),
    "standalone": (  # self-contained: a namespace each, one interpreter (start-up is the cost)
        Step("docs_qwen3_vl", "docs_qwen3_vl", fresh=True), Step("docs_qwen3_vl_moe", "docs_qwen3_vl_moe", fresh=True),
        Step("readme_flash_attention", "readme_flash_attention", checks=("refused",), fresh=True),
        Step("readme_flash_attention[sdpa]", "readme_flash_attention", _sdpa, checks=("inputs",), fresh=True)),
}
STEPS = {step.id: (session, step) for session, steps in SESSIONS.items() for step in steps}
SUBSTITUTION = re.compile(r'^#   "(.+?)" -> (\S+)', re.M)
REFERENCE_SUBSTITUTION = re.compile(r'^#   reference half: "(.+?)" -> (\S+)', re.M)


def read_snippet(name: str) -> tuple[str, str, int]:
    """(header, verbatim code, line number of the code's first line) of tests/snippets/NAME.py."""
    with open(os.path.join(SNIPPETS, name + ".py"), encoding="utf-8") as f:
        text = f.read()
    header, code = text.split(MARK + "\n", 1)
    return header, code, header.count("\n") + 2


def substitutions(header: str, env: dict, side: str) -> list[tuple[str, str]]:
    """The header's ``"OLD" -> NEW`` lines; for the reference half its ``reference half:`` lines win."""
    subs = {old: new for old, new in SUBSTITUTION.findall(header)}
    if side == "reference":
        subs.update(REFERENCE_SUBSTITUTION.findall(header))
    return [(old, new.format(**env)) for old, new in subs.items()]


def swap_imports(code: str) -> str:
    """The reference's imports -> qwen3vl's (the drop-in names)."""
    code = re.sub(r"^([ \t]*)from transformers import ", r"\1from qwen3vl import ", code, flags=re.M)
    code = re.sub(r"^([ \t]*)from qwen_vl_utils import process_vision_info\b",
                  r"\1from qwen3vl import process_vision_info", code, flags=re.M)
    left = re.search(r"^[ \t]*(import|from)[ \t]+(transformers|qwen_vl_utils)\b.*$", code, flags=re.M)
    assert left is None, f"an import the qwen3vl half cannot swap: {left.group(0)!r}"
    return code


def step_code(step: Step, side: str, env: dict) -> dict:
    header, code, first = read_snippet(step.file)
    for old, new in substitutions(header, env, side):
        assert old in code, f"{step.file}: substitution target {old!r} not in the snippet"
        code = code.replace(old, new)
    if step.variant is not None:
        code = step.variant(code)
    if side == "ours":
        code = swap_imports(code)
    return {"id": step.id, "path": os.path.join(SNIPPETS, step.file + ".py"), "code": code, "first_line": first,
            "fresh": step.fresh}


def run_session(session: str, side: str, env: dict, workdir: str) -> dict:
    """Runs one session's steps in a fresh interpreter; returns the runner's result (or its failure)."""
    spec = {"side": side, "threads": 1, "steps": [step_code(s, side, env) for s in SESSIONS[session]]}
    spec_path = os.path.join(workdir, f"{session}-{side}.json")
    out_path = os.path.join(workdir, f"{session}-{side}.pt")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    child_env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                     NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run([sys.executable, RUNNER, spec_path, out_path], capture_output=True, text=True,
                              timeout=TIMEOUT, env=child_env, cwd=workdir)
    except subprocess.TimeoutExpired:
        return {"failed": f"{side} half of session {session} ran over {TIMEOUT} s"}
    if proc.returncode != 0 or not os.path.exists(out_path):
        return {"failed": f"{side} half of session {session} exited {proc.returncode}: {proc.stderr[-3000:]}"}
    result = torch.load(out_path, weights_only=False)
    result["stderr"] = proc.stderr[-3000:]
    return result


class SnippetRuns:
    """Every session's two halves, started at once (``PARALLEL`` interpreters at a time)."""

    def __init__(self, env: dict, workdir: str):
        self.env = env
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL)
        self._futures = {(session, side): self._pool.submit(run_session, session, side, env, workdir)
                         for session in SESSIONS for side in ("ours", "reference")}

    def step(self, step_id: str) -> tuple[dict, dict, dict]:
        """(ours, reference, extras) for one step; a half that failed as a whole raises here."""
        session, _ = STEPS[step_id]
        halves = [self._futures[(session, side)].result() for side in ("ours", "reference")]
        for half in halves:
            if "failed" in half:
                raise AssertionError(half["failed"])
        return halves[0]["steps"][step_id], halves[1]["steps"][step_id], {"shims": halves[1]["shims"],
                                                                           "rewrites": self.rewrites(session)}

    def rewrites(self, session: str) -> dict:
        """Reference-half text -> qwen3vl-half text of the session's ``reference half:`` substitutions."""
        out = {}
        for step in SESSIONS[session]:
            header = read_snippet(step.file)[0]
            ours, theirs = dict(substitutions(header, self.env, "ours")), substitutions(header, self.env, "reference")
            out.update({new: ours[old] for old, new in theirs if ours[old] != new})
        return out

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- checkpoints, media, server
def write_snippet_checkpoint(path: str, config: dict, seed: int) -> str:
    build_processor_dir(path)  # processor files first: the checkpoint's greedy generation_config wins
    return write_checkpoint(path, config, random_tensors(config, seed=seed), generation_config=GREEDY)


def write_media(media: str) -> dict:
    """The files the substitutions point at (odd sizes, several frame rates, a variable one)."""
    os.makedirs(media, exist_ok=True)
    images = {"demo.jpeg": (97, 61), "image1.jpg": (34, 200), "image2.jpg": (301, 199), "your_image.jpg": (97, 61),
              "pipeline-cat-chonk.jpeg": (320, 213), **{f"frame{i}.jpg": (97, 61) for i in range(1, 5)}}
    for i, (name, (w, h)) in enumerate(sorted(images.items())):
        with open(os.path.join(media, name), "wb") as f:
            f.write(jpeg_bytes(random_image(w, h, seed=10 + i)))
    videos = {"space_2997.mp4": (300, Fraction(30000, 1001), 97, 61, False), "space_60.mp4": (240, 60, 34, 200, False),
              "video1.mp4": (50, 25, 97, 61, False), "space_24.mp4": (48, 24, 34, 200, False),
              "space_vfr.mp4": (400, 10, 97, 61, True)}
    for i, (name, (n, fps, w, h, vfr)) in enumerate(sorted(videos.items())):
        write_noise_video(os.path.join(media, name), n, fps, w, h, vfr, seed=20 + i)
    return {"b64_jpeg": base64.b64encode(jpeg_bytes(random_image(61, 97, seed=30))).decode()}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(folder: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=folder)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="session")
def snippet_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("snippets"))
    env = {"moe": write_snippet_checkpoint(os.path.join(root, "moe"), TINY_MOE_CONFIG, seed=7),
           "dense": write_snippet_checkpoint(os.path.join(root, "dense"), TINY_CONFIG, seed=1),
           "media": os.path.join(root, "media")}
    env.update(write_media(env["media"]))
    server, env["http"] = serve(env["media"])
    runs = SnippetRuns(env, tempfile.mkdtemp(dir=root))
    yield runs
    runs.close()
    server.shutdown()
