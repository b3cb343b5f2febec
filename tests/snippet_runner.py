"""One half of a snippet comparison, in a clean interpreter (started by tests/snippet_harness.py):

    python tests/snippet_runner.py SPEC.json OUT.pt

SPEC holds ``side`` ("ours" or "reference"), ``threads`` and ``steps``: ``[{"id", "path", "code",
"first_line", "fresh"}]``, the code with its substitutions and import swaps already made. The steps run
with ``exec`` in one namespace, in order, as the README's blocks share one Python session (a ``fresh``
step starts a new namespace). After each step
the names it bound or rebound are kept (tensors as they are, PIL images as uint8 tensors, dtypes and
metadata as plain values, models as their dtype and device, other objects as their type), with what it
printed and the exception it raised, if any (later steps still run). OUT receives, via ``torch.save``,
``{"steps": {id: {"values", "stdout", "error"}}, "shims": [...]}``.

Test-only set-up of the reference half (nothing of it is in the package):

* torchvision's operator stub (``processor_fixtures.import_torchvision``) before transformers loads;
* ``torchvision.io.decode_image``, when torchvision's image extension cannot load (CPU torch wheel):
  a PIL stand-in that decodes as PIL does (the qwen3vl half decodes with PIL too);
* ``torchvision.io.read_video`` for qwen-vl-utils (gone since torchvision 0.26): PyAV, every frame
  whose time lies in [start_pts, end_pts] seconds, ``video_fps`` = the stream's average rate, as
  torchvision returned them;
* video files and URLs decoded by transformers' own PyAV reader (``load_video(backend="pyav")``) when
  neither torchcodec (not installed) nor torchvision (no video decoding since 0.26) can decode them;
* ``device_map`` dropped from ``from_pretrained`` when accelerate is not installed and there is no
  CUDA device (transformers refuses any device_map without accelerate; "auto" is the CPU here).

In the qwen3vl half, importing transformers, qwen_vl_utils or torchvision raises ImportError: a
snippet cannot lean on the reference by accident.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import io
import json
import os
import sys
import traceback
import types

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCKED = ("transformers", "qwen_vl_utils", "torchvision")


class _BlockReference(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not importable in the qwen3vl half of a snippet run")
        return None


def _pil_decode_image(input, mode=None, apply_exif_orientation=False):
    """Stand-in for ``torchvision.io.decode_image`` (path or uint8 byte tensor -> uint8 (C, H, W))."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    data = open(input, "rb").read() if isinstance(input, str) else input.numpy().tobytes()
    image = Image.open(io.BytesIO(data))
    if apply_exif_orientation:
        image = ImageOps.exif_transpose(image)
    if mode is not None and getattr(mode, "name", str(mode)).endswith("RGB"):
        image = image.convert("RGB")
    array = np.asarray(image)
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _read_video(filename, start_pts=0, end_pts=None, pts_unit="pts", output_format="THWC"):
    """Stand-in for the removed ``torchvision.io.read_video`` (seconds only, as qwen-vl-utils calls it)."""
    import urllib.request

    import av
    import numpy as np
    import torch

    assert pts_unit == "sec", pts_unit
    if filename.startswith(("http://", "https://")):
        with urllib.request.urlopen(filename, timeout=60) as response:
            filename = io.BytesIO(response.read())
    elif filename.startswith("file://"):
        filename = filename[7:]
    end = float("inf") if end_pts is None else end_pts
    with av.open(filename) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)
                  if start_pts <= float(f.time) <= end]
        fps = float(stream.average_rate)
    video = torch.from_numpy(np.stack(frames))
    video = video.permute(0, 3, 1, 2) if output_format == "TCHW" else video
    return video, torch.empty(0), {"video_fps": fps}


def _image_extension_works(torchvision) -> bool:
    import torch

    png = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000"
                        "3a7e9b550000000a4944415478da63f80f00010101001846f1a40000000049454e44ae426082")
    try:
        torchvision.io.decode_image(torch.frombuffer(bytearray(png), dtype=torch.uint8))
        return True
    except RuntimeError:
        return False


def _without_device_map(shims: list):
    from transformers import modeling_utils

    original = modeling_utils.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        if kwargs.get("device_map") is not None:
            shims.append(f"from_pretrained: device_map={kwargs.pop('device_map')!r} dropped (no accelerate)")
        return original(cls, *args, **kwargs)

    modeling_utils.PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def _pyav_video_fetch(shims: list):
    from transformers import video_processing_utils, video_utils

    if video_processing_utils.is_torchcodec_usable(decode="video") \
            or video_processing_utils.is_torchvision_video_decoding_available():
        return

    def fetch_videos(self, video_url_or_urls, sample_indices_fn=None):
        if isinstance(video_url_or_urls, list):
            return list(zip(*[fetch_videos(self, x, sample_indices_fn=sample_indices_fn) for x in video_url_or_urls]))
        return video_utils.load_video(video_url_or_urls, backend="pyav", sample_indices_fn=sample_indices_fn)

    video_processing_utils.BaseVideoProcessor.fetch_videos = fetch_videos
    shims.append("video files: transformers' PyAV reader (torchcodec is not installed, torchvision cannot decode)")


def reference_setup() -> list:
    """The test-only shims of the reference half (module doc); returns what was installed."""
    import torch

    from processor_fixtures import import_torchvision

    shims = []
    torchvision = import_torchvision()
    if torchvision is None:
        shims.append("torchvision is not importable: the reference video processor is unavailable")
    else:
        if not _image_extension_works(torchvision):
            torchvision.io.decode_image = _pil_decode_image
            shims.append("torchvision.io.decode_image: PIL stand-in (the image extension does not load)")
        if not hasattr(torchvision.io, "read_video"):
            torchvision.io.read_video = _read_video
            shims.append("torchvision.io.read_video: PyAV stand-in for qwen-vl-utils")
    if importlib.util.find_spec("accelerate") is None and not torch.cuda.is_available():
        _without_device_map(shims)
    if torchvision is not None:
        _pyav_video_fetch(shims)
    import transformers

    transformers.logging.set_verbosity_error()
    return shims


def plain(value, depth: int = 0):
    """A captured value in a form ``torch.save`` keeps and the test compares."""
    import numpy as np
    import torch
    from PIL import Image

    if depth > 6:
        return {"__object__": type(value).__name__}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, Image.Image):
        return {"__image__": torch.from_numpy(np.asarray(value).copy()), "mode": value.mode}
    if hasattr(value, "generate") and hasattr(value, "dtype"):
        return {"__model__": True, "dtype": str(value.dtype), "device": str(value.device)}
    if hasattr(value, "keys") and hasattr(value, "__getitem__"):
        return {str(k): plain(value[k], depth + 1) for k in value.keys()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if type(value).__name__ == "VideoMetadata":  # transformers' dataclass
        return {k: plain(v, depth + 1) for k, v in vars(value).items()}
    return {"__object__": type(value).__name__}


def _changed(namespace: dict, before: dict) -> dict:
    """The names (re)bound since ``before``, a copy that keeps the old objects alive (ids are reused)."""
    out = {}
    for name, value in namespace.items():
        if name.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if name not in before or before[name] is not value:
            out[name] = plain(value)
    return out


def run_step(step: dict, namespace: dict) -> dict:
    code = "\n" * (step["first_line"] - 1) + step["code"]  # tracebacks give the snippet file's line numbers
    before, out = dict(namespace), io.StringIO()
    error = None
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, step["path"], "exec"), namespace)
    except Exception as exc:  # noqa: BLE001 - recorded and compared by the test
        error = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(limit=-6)}
    return {"values": _changed(namespace, before), "stdout": out.getvalue(), "error": error}


def main(spec_path: str, out_path: str) -> int:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    sys.path.insert(0, HERE)
    if spec["side"] == "ours":
        sys.meta_path.insert(0, _BlockReference())
        shims = []
    else:
        shims = reference_setup()
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    namespace, steps = {}, {}
    for step in spec["steps"]:
        if step.get("fresh") or not namespace:
            namespace = {"__name__": "__main__"}
        steps[step["id"]] = run_step(step, namespace)
    torch.save({"steps": steps, "shims": shims}, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
