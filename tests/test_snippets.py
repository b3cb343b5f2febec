"""Issue 17's acceptance test: each Python snippet of the official Qwen3-VL README (its transformers and
qwen-vl-utils sections) and of transformers' Qwen3-VL and Qwen3-VL-MoE model docs runs unchanged with
qwen3vl's imports and returns what it returns with the reference's (transformers 5.23, qwen-vl-utils 0.0.14).

The snippets are tests/snippets/*.py, verbatim under a header giving their source (repository, path,
commit, lines, section) and the substitutions the harness makes (model ids -> tiny random checkpoints
in the released layout, URLs -> a loopback HTTP server or local files). tests/snippet_harness.py runs
each session of snippets twice, each half in an interpreter of its own (tests/snippet_runner.py, which
lists the test-only shims of the reference half: torchvision's operator stub, PIL for torchvision's
image decoding, transformers' PyAV reader for videos (torchcodec is not installed), PyAV for
qwen-vl-utils' removed ``torchvision.io.read_video``, no device_map without accelerate). Known
incompatibilities would be ``KNOWN`` below: xfail(strict=True), with the measured difference.

Compared, for every step (a snippet, or a documented variant of one):

* ``inputs``: every value the step binds except pixels and generations, with the same names and keys:
  input_ids, attention_mask, mm_token_type_ids, image and video grids; process_vision_info's video
  metadata (but ``video_backend``, the decoder's name) and video_kwargs; chat-template texts; the
  messages after use; model dtype and device. Identical. The qwen3vl half's grids must also agree
  with its pixel rows and its pad tokens.
* ``pixels``: every floating tensor (pixel_values, pixel_values_videos, process_vision_info's videos) and
  process_vision_info's images: the largest |difference| must be 0; each step's largest difference is
  in the failure message and in the table printed at the end of the module.
* ``generation``: generated_ids, the trimmed ids, output_text and what the snippet printed: identical
  (greedy: the tiny checkpoints' generation_config.json does not sample).
* ``refused``: readme_flash_attention as written: both halves refuse it (flash-attn is not installed
  for the reference; qwen3vl names the values it supports), then variant sdpa loads in both.

A reference half that raises where ours runs is not compared: our half's consistency is checked and the
test is skipped with the reference's exact error (none does at present: the shims above made every
reference half run). Video parity over 10/24/25/29.97/60 fps, variable frame rate, 1-40 s, odd sizes
and default / fps=4 / num_frames=8 / num_frames=128 sampling is tests/test_processor_dropin.py's.

Out of scope, with the reason (README of QwenLM/Qwen3-VL at 96588727): the ``pip install`` blocks, the
YaRN config.json excerpt and the ``vllm serve`` / ``sglang.launch_server`` / web demo / docker lines
(shell or JSON, not Python); "Try Qwen3-VL-235B-A22 with API!" (an OpenAI client for DashScope, a remote
service); the vLLM / SGLang "Image / Video Request Example" blocks (OpenAI clients for a vLLM or SGLang
server) and the "Offline Inference" vLLM / SGLang examples (those engines' APIs, not transformers').
"""
from __future__ import annotations

import pytest
import torch

from snippet_harness import STEPS, snippet_runs  # noqa: F401 - session fixture

GENERATION = ("generated_ids", "generated_ids_trimmed", "output_text", "stdout")
IMAGE_PAD, VIDEO_PAD = 151655, 151656
PIXEL_DIFFS: dict[str, dict[str, float]] = {}

NOT_COMPARED = ("video_backend",)  # metadata naming the library that decoded the file (ours: "pyav")

# Known incompatibilities, (step, check) -> reason: xfail(strict=True) until the package is fixed (none now).
KNOWN: dict[tuple[str, str], str] = {}


def flatten(value, path: str = "", out: dict | None = None) -> dict:
    """Captured values -> {path: leaf}; objects other than models and tensors count by presence only."""
    out = {} if out is None else out
    if isinstance(value, dict) and "__image__" in value:
        out[path + ".__image__"] = value["__image__"]
    elif isinstance(value, dict) and "__object__" in value:
        out[path] = "<object>"
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "__model__" and key not in NOT_COMPARED:
                flatten(item, f"{path}.{key}" if path else key, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            flatten(item, f"{path}[{i}]", out)
    else:
        out[path] = value
    return out


def kind(path: str, leaf) -> str:
    if path.split(".")[0].split("[")[0] in GENERATION:
        return "generation"
    if path.endswith("__image__") or (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()):
        return "pixels"
    return "inputs"


def rewritten(value, rewrites: dict):
    """The reference half's strings with its ``reference half:`` substitutions mapped to ours."""
    if isinstance(value, str):
        for theirs, ours in rewrites.items():
            value = value.replace(theirs, ours)
        return value
    if isinstance(value, dict):
        return {k: rewritten(v, rewrites) for k, v in value.items()}
    if isinstance(value, list):
        return [rewritten(v, rewrites) for v in value]
    return value


def leaves(step: dict, check: str, rewrites: dict | None = None) -> dict:
    values = dict(step["values"], stdout=step["stdout"])
    flat = flatten(rewritten(values, rewrites) if rewrites else values)
    return {p: v for p, v in flat.items() if kind(p, v) == check}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    return type(a) is type(b) and a == b


def check_consistent(step: dict):
    """Every captured processor output of one half: grids agree with pixel rows and pad tokens."""
    for name, value in step["values"].items():
        if not (isinstance(value, dict) and "input_ids" in value):
            continue
        ids = value["input_ids"]
        assert value["attention_mask"].shape == ids.shape, name
        for grid_key, pixel_key, pad in (("image_grid_thw", "pixel_values", IMAGE_PAD),
                                         ("video_grid_thw", "pixel_values_videos", VIDEO_PAD)):
            rows = int(value[grid_key].prod(-1).sum()) if grid_key in value else 0
            assert (value[pixel_key].shape[0] if pixel_key in value else 0) == rows, (name, pixel_key)
            assert int((ids == pad).sum()) == rows // 4, (name, grid_key, "pad tokens")


def compare(ours: dict, theirs: dict, check: str, step_id: str, rewrites: dict):
    a, b = leaves(ours, check), leaves(theirs, check, rewrites)
    assert sorted(a) == sorted(b), f"{step_id}: only ours {sorted(set(a) - set(b))}, only the reference's " \
                                   f"{sorted(set(b) - set(a))}"
    if check != "pixels":
        differ = [p for p in sorted(a) if not same(a[p], b[p])]
        shown = "; ".join(f"{p}: {a[p]!r} != {b[p]!r}"[:400] for p in differ)
        assert not differ, f"{step_id}: {check} differ at {shown}"
        return
    diffs = {}
    for path in sorted(a):
        assert a[path].shape == b[path].shape, (step_id, path, a[path].shape, b[path].shape)
        diffs[path] = float((a[path].double() - b[path].double()).abs().max()) if a[path].numel() else 0.0
    PIXEL_DIFFS[step_id] = diffs
    assert diffs, f"{step_id}: no pixels captured"
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] == 0, f"{step_id}: largest |ours - reference| {diffs[worst]:.3g} at {worst} " \
                              f"(all: {', '.join(f'{p} {d:.3g}' for p, d in diffs.items())})"


def check_refused(ours: dict, theirs: dict):
    assert ours["error"] is not None and theirs["error"] is not None, "both halves must refuse flash_attention_2"
    assert ours["error"]["type"] == "CompatError", ours["error"]
    assert "flash_attention_2" in ours["error"]["message"] and "sdpa" in ours["error"]["message"]
    assert "FlashAttention2" in theirs["error"]["message"] or "flash_attn" in theirs["error"]["message"]


def params():
    for step_id, (_, step) in STEPS.items():
        for check in step.checks:
            reason = KNOWN.get((step_id, check))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(step_id, check, id=f"{step_id}-{check}", marks=marks)


@pytest.mark.parametrize("step_id, check", list(params()))
def test_snippet(snippet_runs, step_id, check):  # noqa: F811 - the fixture
    ours, theirs, extras = snippet_runs.step(step_id)
    if check == "refused":
        check_refused(ours, theirs)
        return
    assert ours["error"] is None, f"{step_id}: the qwen3vl half raised:\n{ours['error']['traceback']}"
    check_consistent(ours)
    if theirs["error"] is not None:
        pytest.skip(f"{step_id}: the reference half cannot run here ({'; '.join(extras['shims'])}): "
                    f"{theirs['error']['type']}: {theirs['error']['message']}")
    compare(ours, theirs, check, step_id, extras["rewrites"])


@pytest.fixture(scope="module", autouse=True)
def pixel_difference_table(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not PIXEL_DIFFS:
        return
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        reporter.write_sep("-", "snippets: largest |ours - reference| of pixel values per step")
        for step_id, diffs in PIXEL_DIFFS.items():
            worst = max(diffs.values())
            reporter.write_line(f"{step_id:36s} {worst:.3g}  ({', '.join(f'{p} {d:.3g}' for p, d in diffs.items())})")
