"""Unusable media raise typed errors that name the item and say why."""
from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

from processor_fixtures import jpeg_bytes, processor, processor_dir, random_image, write_video  # noqa: F401
from qwen3vl.processor import (EmptyMediaError, ImageSizeError, MediaDecodeError, MediaError, MediaFetchError,
                               MediaNotFoundError, UnsupportedMediaError)


TOK = dict(tokenize=True, return_dict=True)  # transformers' defaults return the prompt string


def conv(*blocks):
    return [{"role": "user", "content": [*blocks, {"type": "text", "text": "?"}]}]


def good():
    return {"type": "image", "image": random_image(32, 32)}


def test_corrupt_image_bytes(processor, tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8)))
    with pytest.raises(MediaDecodeError) as info:
        processor.apply_chat_template(conv(good(), {"type": "image", "image": str(path)}), **TOK)
    assert "image #1" in str(info.value) and "corrupt.png" in str(info.value)
    assert isinstance(info.value, ValueError) and info.value.index == 1


def test_text_file_named_jpg(processor, tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(MediaDecodeError, match=r"image #0 \(.*notes\.jpg\): not a readable image"):
        processor.apply_chat_template(conv({"type": "image", "image": str(path)}), **TOK)


def test_truncated_jpeg(processor, tmp_path):
    data = jpeg_bytes(random_image(200, 200, seed=1))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaDecodeError, match="cut.jpg"):
        processor.apply_chat_template(conv({"type": "image", "image": str(path)}), **TOK)


def test_missing_file_and_empty_file(processor, tmp_path):
    with pytest.raises(MediaNotFoundError, match="no such file"):
        processor.apply_chat_template(conv({"type": "image", "image": str(tmp_path / "nope.png")}), **TOK)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(EmptyMediaError):
        processor.apply_chat_template(conv({"type": "image", "image": str(empty)}), **TOK)


def test_zero_length_video(processor, tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(EmptyMediaError, match=r"video #0 \(.*empty\.mp4\)"):
        processor.apply_chat_template(conv({"type": "video", "video": str(path)}), **TOK)


def test_corrupt_video(processor, tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)))
    with pytest.raises(MediaDecodeError, match="junk.mp4"):
        processor.apply_chat_template(conv({"type": "video", "video": str(path)}), **TOK)


def test_truncated_video_still_usable_or_clear(processor, tmp_path):
    path = write_video(str(tmp_path / "full.mp4"), 30, fps=10)
    with open(path, "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])
    try:
        out = processor.apply_chat_template(conv({"type": "video", "video": str(cut)}), **TOK)
    except MediaError as exc:  # a clear, typed error naming the file is fine too
        assert "cut.mp4" in str(exc)
    else:
        assert out["video_grid_thw"].shape == (1, 3)


def test_unreachable_url(processor):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused
    url = f"http://127.0.0.1:{port}/cat.png"
    with pytest.raises(MediaFetchError, match=rf"image #0 \({url}\): could not fetch URL"):
        processor.apply_chat_template(conv({"type": "image", "image": url}), timeout=5, **TOK)


def test_aspect_ratio_over_200(processor):
    with pytest.raises(ImageSizeError, match=r"image #1 .*aspect ratio.*300"):
        processor.apply_chat_template(conv(good(), {"type": "image", "image": Image.new("RGB", (300, 1))}), **TOK)
    ok = processor.apply_chat_template(conv({"type": "image", "image": Image.new("RGB", (1, 150))}), **TOK)
    assert ok["image_grid_thw"].tolist() == [[1, 196, 2]]  # 150x1 -> 3136x32 px


def test_bad_base64_and_unsupported_type(processor):
    with pytest.raises(MediaDecodeError):
        processor.apply_chat_template(conv({"type": "image", "image": "data:image/png;base64,AAAAnotapng"}), **TOK)
    with pytest.raises(UnsupportedMediaError, match="image #0"):
        processor.apply_chat_template(conv({"type": "image", "image": 12345}), **TOK)
