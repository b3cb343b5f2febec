"""Video processing against hand-computed expectations of the reference algorithm.

Clips are written with PyAV; frame i is a uniform gray level i*STEP, so the frame that landed in
each temporal position of ``pixel_values_videos`` can be read back.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from processor_fixtures import processor, processor_dir, write_video  # noqa: F401


def act(proc, conversation, **kw):
    """The calls below were written for our old defaults (model inputs); transformers' give the string."""
    return proc.apply_chat_template(conversation, **{"add_generation_prompt": True, "tokenize": True,
                                                     "return_dict": True, **kw})

STEP = 8
VIDEO_PAD = 151656


def video_msg(source, **opts):
    return [{"role": "user", "content": [{"type": "video", "video": source, **opts},
                                         {"type": "text", "text": "What happens?"}]}]


def frame_ids(out, step=STEP):
    """Source frame index of every frame in pixel_values_videos, in (slice, frame-in-pair) order."""
    t, h, w = out["video_grid_thw"][0].tolist()
    pv = out["pixel_values_videos"].view(t, h * w, 3, 2, 16 * 16)    # (t, patches, C, pair, pixels)
    gray = (pv.mean(dim=(1, 2, 4)) + 1) * 127.5                        # (t, pair)
    return (gray / step).round().long().flatten().tolist()


def timestamps(processor, out):
    return re.findall(r"<(\d+\.\d) seconds>", processor.decode(out["input_ids"][0]))


@pytest.fixture(scope="module")
def clip25(tmp_path_factory):
    return write_video(str(tmp_path_factory.mktemp("v") / "c25.mp4"), 25, fps=10)


def test_fps_sampling_odd_count(processor, clip25):
    out = act(processor, video_msg(clip25))
    # 25 frames at 10 fps, sampled at 2 fps: n = int(25/10*2) = 5 -> linspace(0, 24, 5) = 0,6,12,18,24
    assert out.video_metadata[0]["frames_indices"] == [0, 6, 12, 18, 24]
    # 5 frames pad to 6 by repeating frame 24 -> 3 slices; 48x64 px -> 64x64 px -> grid 4x4
    assert out["video_grid_thw"].tolist() == [[3, 4, 4]]
    assert frame_ids(out) == [0, 6, 12, 18, 24, 24]
    # slice times: (0+0.6)/2, (1.2+1.8)/2, (2.4+2.4)/2
    assert timestamps(processor, out) == ["0.3", "1.5", "2.4"]
    assert (out["input_ids"] == VIDEO_PAD).sum().item() == 3 * 4 * 4 // 4
    assert out["pixel_values_videos"].shape == (3 * 16, 3 * 2 * 16 * 16)
    assert out["pixel_values_videos"].dtype == torch.float32
    assert (out["mm_token_type_ids"] == 2).sum().item() == 12
    text = processor.decode(out["input_ids"][0])
    one = "<|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>"
    assert "<0.3 seconds>" + one + "<1.5 seconds>" + one + "<2.4 seconds>" + one in text


def test_num_frames(processor, clip25):
    out = act(processor, video_msg(clip25, num_frames=8))
    # linspace(0, 24, 8) = 0, 3.43, 6.86, 10.29, 13.71, 17.14, 20.57, 24 -> rounded
    assert out.video_metadata[0]["frames_indices"] == [0, 3, 7, 10, 14, 17, 21, 24]
    assert frame_ids(out) == [0, 3, 7, 10, 14, 17, 21, 24]
    # (0+0.3)/2=0.15 -> "0.1" (0.15 is 0.1499.. in binary), (0.7+1.0)/2=0.85 -> "0.8", 1.55 -> "1.5", 2.25 -> "2.2"
    assert timestamps(processor, out) == ["0.1", "0.8", "1.5", "2.2"]
    assert out["video_grid_thw"].tolist() == [[4, 4, 4]]
    per_call = act(processor, video_msg(clip25), num_frames=8)
    assert torch.equal(per_call["input_ids"], out["input_ids"])


def test_fps_override(processor, clip25):
    out = act(processor, video_msg(clip25, fps=4))
    # n = int(25/10*4) = 10 -> linspace(0, 24, 10) rounded
    assert out.video_metadata[0]["frames_indices"] == [0, 3, 5, 8, 11, 13, 16, 19, 21, 24]
    assert out["video_grid_thw"].tolist() == [[5, 4, 4]]


def test_clip_shorter_than_min_frames(processor, tmp_path):
    path = write_video(str(tmp_path / "c3.mp4"), 3, fps=10)
    out = act(processor, video_msg(path))
    # n = int(3/10*2) = 0 -> max(0, min_frames 4) = 4 -> min(4, 768, total 3) = 3 -> 0,1,2 (+2 as pad)
    assert out.video_metadata[0]["frames_indices"] == [0, 1, 2]
    assert frame_ids(out) == [0, 1, 2, 2]
    # (0+0.1)/2 = 0.05 -> "0.1"; (0.2+0.2)/2 = 0.2
    assert timestamps(processor, out) == ["0.1", "0.2"]
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]


def test_total_pixel_budget(processor, tmp_path):
    path = write_video(str(tmp_path / "big.mp4"), 40, fps=10, width=640, height=480, step=6)
    out = act(processor, video_msg(path, total_pixels=8 * 128 * 128))
    # n = int(40/10*2) = 8 -> linspace(0, 39, 8) rounded
    assert out.video_metadata[0]["frames_indices"] == [0, 6, 11, 17, 22, 28, 33, 39]
    # 8*480*640 > 131072: beta = sqrt(8*480*640/131072) = 4.33 -> h = floor(480/4.33/32)*32 = 96,
    # w = floor(640/4.33/32)*32 = 128 -> grid (4, 6, 8), 12 tokens per slice
    assert out["video_grid_thw"].tolist() == [[4, 6, 8]]
    assert frame_ids(out, step=6) == [0, 6, 11, 17, 22, 28, 33, 39]
    assert (out["input_ids"] == VIDEO_PAD).sum().item() == 4 * 12
    # default budget keeps the native 480x640 size (8*480*640 < 25165824): grid 30 x 40
    full = act(processor, video_msg(path))
    assert full["video_grid_thw"].tolist() == [[4, 30, 40]]


def test_frame_list_with_sample_fps(processor, tmp_path):
    frames = [Image.fromarray(np.full((48, 64, 3), i * STEP, np.uint8)) for i in range(5)]
    paths = []
    for i, f in enumerate(frames):
        paths.append(str(tmp_path / f"f{i}.png"))
        f.save(paths[-1])
    out = act(processor, video_msg(paths, sample_fps=1))
    # all frames kept (already sampled), padded 5 -> 6; frame i at i/1 s: slices (0,1), (2,3), (4,4)
    assert out.video_metadata[0]["frames_indices"] == [0, 1, 2, 3, 4]
    assert frame_ids(out) == [0, 1, 2, 3, 4, 4]
    assert timestamps(processor, out) == ["0.5", "2.5", "4.0"]
    same = act(processor, video_msg(frames, sample_fps=1))
    assert torch.equal(same["pixel_values_videos"], out["pixel_values_videos"])


def test_array_video_and_call_api(processor, clip25):
    arr = np.stack([np.full((48, 64, 3), i * STEP, np.uint8) for i in range(4)])  # (T, H, W, C)
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n"
    out = processor(text=text, videos=[arr])
    assert frame_ids(out) == [0, 1, 2, 3]
    assert timestamps(processor, out) == ["0.2", "1.2"]  # default 2 frames/s: (0+0.5)/2, (1+1.5)/2
    two = processor(text=[text, text], videos=[clip25, arr], return_metadata=True)
    assert two["video_grid_thw"].tolist() == [[3, 4, 4], [2, 4, 4]]
    assert two["video_metadata"][0]["frames_indices"] == [0, 6, 12, 18, 24]


def test_video_and_image_together(processor, clip25):
    image = Image.fromarray(np.full((64, 64, 3), 200, np.uint8))
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "video", "video": clip25},
                                         {"type": "text", "text": "Both?"}]}]
    out = act(processor, conv)
    assert {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"} <= set(out)
    ids = out["input_ids"][0].tolist()
    assert ids.index(151655) < ids.index(VIDEO_PAD)  # prompt order kept


def test_container_without_frame_count(processor, tmp_path):
    # Matroska headers carry no frame count: the count comes from the packets
    path = write_video(str(tmp_path / "c12.mkv"), 12, fps=4, codec="ffv1")
    out = act(processor, video_msg(path))
    # n = int(12/4*2) = 6 -> linspace(0, 11, 6) = 0, 2.2, 4.4, 6.6, 8.8, 11 -> 0,2,4,7,9,11
    assert out.video_metadata[0]["frames_indices"] == [0, 2, 4, 7, 9, 11]
    assert out.video_metadata[0]["total_num_frames"] == 12
    assert frame_ids(out) == [0, 2, 4, 7, 9, 11]
    # (0+0.5)/2=0.25 -> "0.2", (1+1.75)/2=1.375 -> "1.4", (2.25+2.75)/2 = 2.5
    assert timestamps(processor, out) == ["0.2", "1.4", "2.5"]
