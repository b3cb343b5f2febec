"""Drop-in behaviour for code copied from the Qwen3-VL README / transformers docs (issue 17).

Videos are compared with transformers' own video processor (torchvision-backed, test-only):
input_ids, attention_mask and grids identical, pixel values bit-identical.
"""
from __future__ import annotations

import json
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

from processor_fixtures import (import_torchvision, make_reference_processor, processor, processor_dir,  # noqa: F401
                                random_image, reference)
from qwen3vl.processor import ImageSizeError, MediaError, Processor, UnsupportedMediaError


def write_noise_video(path, num_frames, fps=10, width=97, height=61, vfr=False, seed=0):
    """A textured clip (random noise per frame); ``fps`` may be a Fraction; ``vfr`` jitters the pts."""
    import av

    rng = np.random.RandomState(seed)
    container = av.open(path, mode="w")
    stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"  # 4:4:4: odd sizes allowed
    stream.options = {"qp": "0"} if stream.codec_context.name == "libx264" else {"qscale": "1", "g": "1"}
    if vfr:
        stream.codec_context.time_base = Fraction(1, 1000)
    pts = 0
    for i in range(num_frames):
        frame = av.VideoFrame.from_ndarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
        if vfr:
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            pts += int(1000 / float(fps)) + (i % 3) * 7
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def decode_all(path):
    """(frames (T, H, W, 3) uint8, fps) with PyAV, every frame."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        rate = stream.average_rate or stream.guessed_rate
    return np.stack(frames), float(rate)


@pytest.fixture(scope="module")
def full_reference(processor_dir):
    """transformers' Qwen3VLProcessor with its real (torchvision) video processor."""
    if import_torchvision() is None:
        pytest.skip("torchvision==0.28.0 (test extra, --no-deps) is not importable")
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    base = make_reference_processor(processor_dir)
    with open(os.path.join(processor_dir, "video_preprocessor_config.json"), encoding="utf-8") as f:
        cfg = {k: v for k, v in json.load(f).items() if k not in ("processor_class", "video_processor_type")}
    return Qwen3VLProcessor(image_processor=base.image_processor, tokenizer=base.tokenizer,
                            video_processor=Qwen3VLVideoProcessor(**cfg), chat_template=base.chat_template)


def user(*blocks):
    return [{"role": "user", "content": list(blocks)}]


def assert_identical(a, b, keys, tol=0.0):
    for key in keys:
        x, y = torch.as_tensor(np.asarray(a[key])), torch.as_tensor(np.asarray(b[key]))
        assert x.shape == y.shape, (key, x.shape, y.shape)
        diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        assert diff <= (tol if key.startswith("pixel") else 0.0), f"{key}: largest difference {diff}"


VIDEO_KEYS = ("input_ids", "attention_mask", "video_grid_thw", "pixel_values_videos")
CLIPS = [  # (frames, fps, width, height, vfr)
    (10, 10, 97, 61, False), (48, 24, 34, 200, False), (50, 25, 97, 61, False),
    (60, Fraction(30000, 1001), 64, 48, False), (120, 60, 97, 61, False), (30, 10, 97, 61, True),
    (400, 10, 34, 200, False)]
SAMPLING = [{}, {"fps": 4}, {"num_frames": 8, "fps": None}, {"num_frames": 128, "fps": None}]  # README's form


@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: f"{c[0]}f@{float(c[1]):.2f}-{c[2]}x{c[3]}{'-vfr' if c[4] else ''}")
@pytest.mark.parametrize("sampling", SAMPLING, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items() if v) or "default")
def test_video_parity_with_reference(processor, full_reference, tmp_path, clip, sampling):
    from transformers.video_utils import VideoMetadata

    n, fps, width, height, vfr = clip
    path = write_noise_video(str(tmp_path / "clip.mp4"), n, fps, width, height, vfr)
    frames, video_fps = decode_all(path)
    text = "<|vision_start|><|video_pad|><|vision_end|>Describe."
    ours = processor(text=[text], videos=[path], **sampling)
    meta = VideoMetadata(total_num_frames=len(frames), fps=video_fps, frames_indices=list(range(len(frames))))
    theirs = full_reference(text=[text], videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)],
                            video_metadata=[meta], do_sample_frames=True, return_tensors="pt", **sampling)
    assert_identical(ours, theirs, VIDEO_KEYS)


def test_qwen_vl_utils_flow_matches_reference(processor, full_reference, tmp_path):
    """README: process_vision_info(..., return_video_metadata=True) -> processor(..., do_resize=False)."""
    from qwen3vl.processor.vision_info import process_vision_info

    path = write_noise_video(str(tmp_path / "v.mp4"), 75, 25, 97, 61)
    messages = user({"type": "image", "image": random_image(120, 90, seed=1)},
                    {"type": "video", "video": path, "fps": 4, "max_pixels": 128 * 32 * 32},
                    {"type": "text", "text": "What happens?"})
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert isinstance(text, str) and text == full_reference.apply_chat_template(messages, add_generation_prompt=True)
    images, videos, video_kwargs = process_vision_info(messages, image_patch_size=16, return_video_kwargs=True,
                                                       return_video_metadata=True)
    videos, metadatas = zip(*videos)
    kw = dict(text=[text], images=images, videos=list(videos), video_metadata=list(metadatas), do_resize=False,
              return_tensors="pt", **video_kwargs)
    ours, theirs = processor(**kw), full_reference(**kw)
    # frames arrive as float32 0..255 here; the reference normalises floats in another order: one float32
    # ulp at most (measured 1.19e-7); uint8 inputs (test above) are bit-exact
    assert_identical(ours, theirs, VIDEO_KEYS + ("pixel_values", "image_grid_thw"), tol=2.4e-7)
    np_out = processor(**{**kw, "return_tensors": "np"})
    assert isinstance(np_out["input_ids"], np.ndarray) and np.array_equal(np_out["input_ids"], ours.input_ids.numpy())


def test_num_frames_beyond_clip_repeats_frames(processor, full_reference, tmp_path):
    path = write_noise_video(str(tmp_path / "short.mp4"), 12, 10)
    ours = processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[path], num_frames=128)
    assert ours.video_metadata[0]["frames_indices"][:4] == [0, 0, 0, 0]
    assert ours["video_grid_thw"][0, 0].item() == 64


def test_decode_and_template_defaults(processor, reference):
    conv = user({"type": "image", "image": random_image(64, 64)}, {"type": "text", "text": "Hi , there ."})
    text = processor.apply_chat_template(conv, add_generation_prompt=True, add_vision_id=True)
    assert isinstance(text, str) and "Picture 1:" in text
    assert processor.apply_chat_template(conv) == reference.apply_chat_template(conv)
    ids = processor.apply_chat_template(conv, tokenize=True)
    assert isinstance(ids, torch.Tensor) and ids.shape[0] == 1
    batch = processor.apply_chat_template(conv, tokenize=True, return_dict=True)
    seqs = batch["input_ids"]
    for kw in ({}, {"skip_special_tokens": True}, {"skip_special_tokens": True, "clean_up_tokenization_spaces": False},
               {"skip_special_tokens": True, "clean_up_tokenization_spaces": True}):
        assert processor.batch_decode(seqs, **kw) == reference.batch_decode(seqs, **kw), kw
        assert processor.decode(seqs[0], **kw) == reference.decode(seqs[0], **kw), kw
    assert processor.tokenizer.padding_side == reference.tokenizer.padding_side == "right"


def test_batch_feature_api(processor):
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>a", "b"], images=[random_image(64, 64)])
    assert out.input_ids is out["input_ids"] and "pixel_values" in out.keys()
    assert out.attention_mask[1, 0] == 1  # right padding by default
    half = out.to(torch.bfloat16)
    assert half.pixel_values.dtype == torch.bfloat16 and half.input_ids.dtype == torch.int64
    moved = out.to("cpu")
    assert moved.pixel_values.dtype == torch.float32
    grid = out.pop("image_grid_thw")
    assert "image_grid_thw" not in out and grid.tolist() == [[1, 16, 16]]  # 64x64 -> min 65536 px


def test_image_processor_settings_are_honoured(processor_dir, reference):
    proc = Processor.from_pretrained(processor_dir)
    assert proc.image_processor.patch_size == 16 and proc.image_processor.merge_size == 2
    assert proc.image_processor.temporal_patch_size == 2 and proc.video_processor.fps == 2.0
    image = random_image(1000, 800, seed=3)
    proc.image_processor.size = {"longest_edge": 128 * 128, "shortest_edge": 64 * 64}
    out = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image])
    assert out["image_grid_thw"].tolist() == [[1, 6, 8]]
    proc.image_processor.max_pixels = 256 * 256
    assert proc.image_processor.size["longest_edge"] == 65536
    assert proc(text=["<|image_pad|>"], images=[image])["image_grid_thw"].tolist() == [[1, 14, 16]]
    proc.video_processor.fps = 1.0
    assert proc.video_params.fps == 1.0
    proc.image_processor.size = {"longest_edge": 10}
    with pytest.raises(ValueError, match="shortest_edge"):
        proc(text=["<|image_pad|>"], images=[image])


@pytest.mark.parametrize("block, error, words", [
    ({"type": "image", "image": None}, UnsupportedMediaError, "image #0"),
    ({"type": "image", "image": "IMAGE", "max_pixels": -5}, ImageSizeError, "max_pixels must be a positive"),
    ({"type": "image", "image": "IMAGE", "min_pixels": 0}, ImageSizeError, "min_pixels must be a positive"),
    ({"type": "image", "image": "IMAGE", "resized_height": 64}, ImageSizeError, "given together"),
    ({"type": "image", "base64": "bm90IGFuIGltYWdl"}, MediaError, "not a readable image"),
])
def test_bad_items_raise_typed_errors(processor, block, error, words):
    block = {k: (random_image(120, 90) if v == "IMAGE" else v) for k, v in block.items()}
    with pytest.raises(error, match=words) as info:
        processor.apply_chat_template(user(block, {"type": "text", "text": "?"}), tokenize=True, return_dict=True)
    assert "image #0" in str(info.value)


def test_raw_base64_part_and_item_sizes(processor):
    import base64
    import io

    buf = io.BytesIO()
    random_image(120, 90, seed=4).save(buf, format="PNG")
    raw = base64.b64encode(buf.getvalue()).decode()
    tok = dict(tokenize=True, return_dict=True)
    out = processor.apply_chat_template(user({"type": "image", "base64": raw, "max_pixels": 16384}), **tok)
    assert out["image_grid_thw"].tolist() == [[1, 6, 8]]  # qwen-vl-utils: 96 x 128 px
    small = processor.apply_chat_template(user({"type": "image", "image": random_image(300, 300),
                                                "resized_height": 64, "resized_width": 64}), **tok)
    assert small["image_grid_thw"].tolist() == [[1, 4, 4]]
