"""Processor speed: ours vs the reference, in one run.

1. One 1920x1080 image: our processor call (the live path: load, resize, patchify, tokenize)
   vs transformers' Qwen2-VL PIL image processor.
2. A 30 s 720p clip (written here with PyAV): our video path (decode only what is sampled)
   vs a qwen-vl-utils-style pipeline (decode and convert every frame with PyAV, keep the
   sampled ones, resize with torch bicubic+antialias, normalise, patchify).

Prints a table, then ONE JSON line. Run alone: timings on a busy machine are meaningless.
Usage: python bench/bench_processor.py [--repeats 5] [--model-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_image() -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1080, 0:1920]
    img = np.stack([xx * 255 // 1920, yy * 255 // 1080, (xx + yy) % 256], -1) + rng.integers(0, 32, (1080, 1920, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_clip(path: str, seconds: int = 30, fps: int = 30, width: int = 1280, height: int = 720) -> str:
    import av

    container = av.open(path, mode="w")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if codec == "libx264":
        stream.options = {"preset": "ultrafast"}
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(seconds * fps):
        frame = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, np.full_like(xx, (3 * i) % 256)], -1)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def baseline_video(path: str, fps: float = 2.0, max_pixels: int = 25165824, min_pixels: int = 4096):
    """qwen-vl-utils style: decode every frame, sample, resize (torch bicubic AA), normalise, patchify."""
    import av

    container = av.open(path)
    stream = container.streams.video[0]
    video_fps = float(stream.average_rate)
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]  # every frame converted
    container.close()
    total = len(frames)
    n = min(max(int(total / video_fps * fps), 4), 768, total)
    idx = np.linspace(0, total - 1, n).round().astype(int)
    video = torch.from_numpy(np.stack([frames[i] for i in idx])).permute(0, 3, 1, 2)  # (T, 3, H, W)
    t, _, h, w = video.shape
    beta = math.sqrt(t * h * w / max_pixels) if t * h * w > max_pixels else 1.0
    rh, rw = max(32, round(h / beta / 32) * 32), max(32, round(w / beta / 32) * 32)
    video = F.interpolate(video.float(), size=(rh, rw), mode="bicubic", antialias=True).round().clamp(0, 255)
    video = (video / 255 - 0.5) / 0.5
    if t % 2:
        video = torch.cat([video, video[-1:]], 0)
    gt, gh, gw = video.shape[0] // 2, rh // 16, rw // 16
    x = video.view(gt, 2, 3, gh // 2, 2, 16, gw // 2, 2, 16).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, 3 * 2 * 16 * 16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model-dir", default=None, help="checkpoint folder (default: built from test fixtures)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from processor_fixtures import build_processor_dir, import_torchvision, make_reference_processor
    from qwen3vl.processor import Processor

    import_torchvision()  # test-only torchvision needs its op stub before transformers imports it

    tmp = tempfile.mkdtemp(prefix="qwen3vl_bench_")
    model_dir = args.model_dir or build_processor_dir(os.path.join(tmp, "model"))
    ours = Processor.from_pretrained(model_dir)
    ref = make_reference_processor(model_dir)

    image = make_image()
    image_text = "<|vision_start|><|image_pad|><|vision_end|>"
    t_img_ours = timeit(lambda: ours(text=image_text, images=[image]), args.repeats)
    t_img_ref = timeit(lambda: ref.image_processor(images=[image], return_tensors="pt"), args.repeats)
    a = ours(text=image_text, images=[image])["pixel_values"]
    b = ref.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    img_diff = (a - b).abs().mean().item()

    clip = write_clip(os.path.join(tmp, "clip.mp4"))
    text = "<|vision_start|><|video_pad|><|vision_end|>"
    t_vid_ours = timeit(lambda: ours(text=text, videos=[clip]), max(1, args.repeats // 2))
    t_vid_base = timeit(lambda: baseline_video(clip), max(1, args.repeats // 2))
    grid = ours(text=text, videos=[clip])["video_grid_thw"][0].tolist()

    rows = [("image 1920x1080", t_img_ours, t_img_ref, "transformers Qwen2VLImageProcessorPil"),
            ("video 30s 720p @2fps", t_vid_ours, t_vid_base, "PyAV decode-all + torch resize")]
    print(f"{'case':<24}{'ours (ms)':>12}{'baseline (ms)':>15}{'speedup':>10}  baseline")
    for name, o, r, what in rows:
        print(f"{name:<24}{o * 1e3:>12.1f}{r * 1e3:>15.1f}{r / o:>9.2f}x  {what}")
    print(f"image pixel_values mean |diff| vs reference: {img_diff:.2e}; video grid {grid}")
    print(json.dumps({"bench": "processor", "image_ms": round(t_img_ours * 1e3, 2),
                      "image_ref_ms": round(t_img_ref * 1e3, 2), "image_speedup": round(t_img_ref / t_img_ours, 3),
                      "video_ms": round(t_vid_ours * 1e3, 1), "video_baseline_ms": round(t_vid_base * 1e3, 1),
                      "video_speedup": round(t_vid_base / t_vid_ours, 3), "image_mean_abs_diff": img_diff,
                      "video_grid_thw": grid, "threads": torch.get_num_threads()}))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
