"""``qwen3vl.processor.vision_info.process_vision_info`` against qwen-vl-utils 0.0.14 (test extra).

Same inputs to both; images must come back the same size and pixel-identical, videos as identical
float32 (T, C, H, W) tensors with the same metadata and video_kwargs. ``video_start`` / ``video_end``
are compared with qwen-vl-utils' torchcodec reader (torchcodec stood in for by PyAV, test-only).
"""
from __future__ import annotations

import sys
import types
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from processor_fixtures import import_torchvision, random_image
from qwen3vl.processor import ImageSizeError, MediaError, UnsupportedMediaError
from qwen3vl.processor.vision_info import process_vision_info
from test_processor_dropin import decode_all, write_noise_video


@pytest.fixture(scope="module")
def qvu():
    if import_torchvision() is None:
        pytest.skip("torchvision==0.28.0 (test extra, --no-deps) is not importable")
    module = pytest.importorskip("qwen_vl_utils.vision_process")
    if not hasattr(module.io, "read_video"):  # torchvision 0.28 dropped it; qwen-vl-utils still calls it
        module.io.read_video = _read_video_shim
    return module


def _read_video_shim(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
    """Test-only stand-in for the removed ``torchvision.io.read_video`` (whole clip, PyAV, TCHW uint8,
    ``video_fps`` = the stream's average rate, as torchvision reported it)."""
    assert start_pts == 0.0 and end_pts is None and output_format == "TCHW"
    frames, fps = decode_all(path)
    return torch.from_numpy(frames).permute(0, 3, 1, 2), torch.empty(0), {"video_fps": fps}


def msgs(*blocks):
    return [{"role": "user", "content": [*blocks, {"type": "text", "text": "?"}]}]


SIZES = [(1, 1), (20, 20), (97, 61), (34, 200), (120, 90), (640, 480), (1920, 1080), (8000, 6000)]
OPTIONS = [{}, {"max_pixels": 16384}, {"min_pixels": 300000}, {"max_pixels": 1024 * 28 * 28},
           {"min_pixels": 4096, "max_pixels": 4096 * 4}, {"resized_height": 64, "resized_width": 64},
           {"resized_height": 300, "resized_width": 500}, {"resized_height": 7, "resized_width": 1000}]


def image_for(width, height):
    if width * height > 4_000_000:  # large: cheap content, sizes are what matter
        return Image.new("RGB", (width, height), (10, 200, 30))
    return random_image(width, height, seed=width + height)


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_images_match_qwen_vl_utils(qvu, size, patch):
    image = image_for(*size)
    for opts in OPTIONS:
        conv = msgs({"type": "image", "image": image, **opts})
        try:
            expected, _ = qvu.process_vision_info(conv, image_patch_size=patch)
        except (AssertionError, ValueError) as exc:  # qwen-vl-utils refuses: so must we, with a typed error
            with pytest.raises(MediaError, match="image #0"):
                process_vision_info(conv, image_patch_size=patch)
            continue
        ours, videos = process_vision_info(conv, image_patch_size=patch)
        assert videos is None and ours[0].size == expected[0].size, (size, opts)
        if size[0] * size[1] <= 4_000_000:
            assert np.array_equal(np.asarray(ours[0]), np.asarray(expected[0])), (size, opts)


def test_image_sources(qvu, tmp_path):
    import base64
    import io

    image = random_image(97, 61, seed=3)
    path = tmp_path / "a.png"
    image.save(path)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    for source in (str(path), f"file://{path}", data, image):
        ours, _ = process_vision_info(msgs({"type": "image", "image": source}), image_patch_size=16)
        ref, _ = qvu.process_vision_info(msgs({"type": "image", "image": source}), image_patch_size=16)
        assert np.array_equal(np.asarray(ours[0]), np.asarray(ref[0]))


VIDEO_OPTIONS = [{}, {"fps": 4}, {"nframes": 8}, {"max_pixels": 128 * 32 * 32}, {"total_pixels": 20480 * 32 * 32},
                 {"min_pixels": 64 * 32 * 32, "fps": 1}, {"resized_height": 96, "resized_width": 128},
                 {"fps": 2, "min_frames": 6, "max_frames": 10}]


@pytest.mark.parametrize("clip", [(30, 10, 97, 61), (48, 24, 34, 200), (100, 25, 64, 48)],
                         ids=lambda c: f"{c[0]}f@{c[1]}-{c[2]}x{c[3]}")
def test_video_files_match_qwen_vl_utils(qvu, tmp_path, clip):
    n, fps, width, height = clip
    path = write_noise_video(str(tmp_path / "v.mp4"), n, fps, width, height)
    for opts in VIDEO_OPTIONS:
        conv = msgs({"type": "video", "video": path, **opts})
        try:
            ref = qvu.process_vision_info(conv, image_patch_size=16, return_video_kwargs=True,
                                          return_video_metadata=True)
        except Exception as exc:  # noqa: BLE001 - the reference's video reader may be unusable here
            pytest.skip(f"qwen-vl-utils cannot read videos here: {exc}")
        ours = process_vision_info(conv, image_patch_size=16, return_video_kwargs=True, return_video_metadata=True)
        (a, meta_a), (b, meta_b) = ours[1][0], ref[1][0]
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, opts
        assert torch.equal(a, b), (opts, (a - b).abs().max())
        assert list(map(int, meta_a["frames_indices"])) == list(map(int, meta_b["frames_indices"]))
        assert meta_a["total_num_frames"] == meta_b["total_num_frames"] and meta_a["fps"] == pytest.approx(meta_b["fps"])
        assert ours[2] == ref[2]


def test_frame_lists_and_sample_fps(qvu):
    frames = [random_image(97, 61, seed=i) for i in range(5)]
    for kw in (dict(return_video_kwargs=True), dict(return_video_kwargs=True, return_video_metadata=True)):
        conv = msgs({"type": "video", "video": frames, "sample_fps": 1})
        ours = process_vision_info(conv, image_patch_size=16, **kw)
        ref = qvu.process_vision_info(conv, image_patch_size=16, **kw)
        a, b = (ours[1][0], ref[1][0]) if "return_video_metadata" not in kw else (ours[1][0][0], ref[1][0][0])
        assert torch.equal(a, b)
        assert ours[2] == ref[2]


def test_num_frames_alias_and_errors(tmp_path):
    path = write_noise_video(str(tmp_path / "v.mp4"), 20, 10)
    _, videos = process_vision_info(msgs({"type": "video", "video": path, "num_frames": 6}), image_patch_size=16)
    assert videos[0].shape[0] == 6
    with pytest.raises(UnsupportedMediaError, match="video #0"):
        process_vision_info(msgs({"type": "video", "video": path, "nframes": 64}), image_patch_size=16)
    with pytest.raises(UnsupportedMediaError, match="image #0"):
        process_vision_info(msgs({"type": "image", "image": None}))
    with pytest.raises(ImageSizeError, match="image #0.*max_pixels must be a positive"):
        process_vision_info(msgs({"type": "image", "image": random_image(50, 50), "max_pixels": -5}))
    with pytest.raises(MediaError, match="image #1"):
        process_vision_info(msgs({"type": "image", "image": random_image(50, 50)},
                                 {"type": "image", "image": str(tmp_path / "missing.png")}))


class _StandInVideoDecoder:
    """Test-only stand-in for ``torchcodec.decoders.VideoDecoder`` (not installed here), decoding with
    PyAV, so that qwen-vl-utils' torchcodec reader (the README's recommended backend, the one that
    honours ``video_start`` / ``video_end`` by frame index) runs unchanged."""

    def __init__(self, path, num_ffmpeg_threads=0):
        self._frames, fps = decode_all(path)
        self.metadata = types.SimpleNamespace(average_fps=fps, num_frames=len(self._frames))

    def get_frames_at(self, indices):
        return types.SimpleNamespace(data=torch.from_numpy(self._frames[list(indices)]).permute(0, 3, 1, 2))


@pytest.fixture
def qvu_torchcodec(qvu, monkeypatch):
    decoders = types.ModuleType("torchcodec.decoders")
    decoders.VideoDecoder = _StandInVideoDecoder
    monkeypatch.setitem(sys.modules, "torchcodec", types.ModuleType("torchcodec"))
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", decoders)
    monkeypatch.setattr(qvu, "get_video_reader_backend", lambda: "torchcodec")
    return qvu


WINDOWS = [{"video_start": 1.0, "video_end": 3.0}, {"video_start": 0.5}, {"video_end": 2.2},
           {"video_start": 1.3, "video_end": 2.9, "fps": 4}, {"video_start": 1.0, "video_end": 3.5, "nframes": 8},
           {"video_start": -2, "video_end": 99}, {"video_start": 0.3, "max_pixels": 128 * 32 * 32}]


@pytest.mark.parametrize("clip", [(100, 25, 97, 61), (60, Fraction(30000, 1001), 34, 200)],
                         ids=lambda c: f"{c[0]}f@{float(c[1]):.2f}-{c[2]}x{c[3]}")
def test_video_start_end_match_qwen_vl_utils(qvu_torchcodec, tmp_path, clip):
    n, fps, width, height = clip
    path = write_noise_video(str(tmp_path / "v.mp4"), n, fps, width, height)
    for opts in WINDOWS:
        conv = msgs({"type": "video", "video": path, **opts})
        kw = dict(image_patch_size=16, return_video_kwargs=True, return_video_metadata=True)
        ref, ours = qvu_torchcodec.process_vision_info(conv, **kw), process_vision_info(conv, **kw)
        (a, meta_a), (b, meta_b) = ours[1][0], ref[1][0]
        assert meta_b["video_backend"] == "torchcodec" and a.shape == b.shape, opts
        assert torch.equal(a, b), (opts, (a - b).abs().max())
        assert list(map(int, meta_a["frames_indices"])) == list(map(int, meta_b["frames_indices"])), opts
        assert meta_a["total_num_frames"] == meta_b["total_num_frames"], opts
        assert meta_a["fps"] == pytest.approx(meta_b["fps"]) and ours[2] == ref[2], opts
    no_window = process_vision_info(msgs({"type": "video", "video": path, "nframes": 8}), **kw)
    assert list(map(int, no_window[1][0][1]["frames_indices"]))[-1] == n - 1


def test_video_start_end_errors(tmp_path):
    path = write_noise_video(str(tmp_path / "v.mp4"), 30, 10)  # 3 s
    for opts in ({"video_start": 2.5, "video_end": 1.0}, {"video_start": 5.0}, {"video_start": "1"}):
        with pytest.raises(UnsupportedMediaError, match="video #0.*video_start"):
            process_vision_info(msgs({"type": "video", "video": path, **opts}), image_patch_size=16)
    frames = [random_image(97, 61, seed=i) for i in range(4)]  # frame lists ignore the window, as qwen-vl-utils
    _, videos = process_vision_info(msgs({"type": "video", "video": frames, "video_start": 1.0}), image_patch_size=16)
    assert videos[0].shape[0] == 4
