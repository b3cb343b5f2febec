"""``MediaLimits`` against hostile media, each built here: canvas and pixel bombs, a static video of
many frames, out-of-range options, formats outside the allow-lists, a playlist that points outside
its folder. Every refusal is a typed ``MediaError`` naming the item, the option or limit and its
value; the memory-hungry inputs run in a fresh process whose peak RSS growth is measured."""
from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from processor_fixtures import processor, processor_dir, write_video  # noqa: F401
from qwen3vl.processor import (MediaDecodeError, MediaError, MediaLimitError, MediaLimits, MediaOptionError, Processor,
                               UnsupportedMediaError)
from qwen3vl.processor.media import load_image, load_video

RSS_BUDGET_MB = 300
TOK = dict(tokenize=True, return_dict=True)
VIDEO_TEXT = "<|vision_start|><|video_pad|><|vision_end|>"


# ---------------------------------------------------------------------------- hostile inputs
def gif_canvas_bomb(width: int = 7568, height: int = 32784) -> bytes:
    """A few dozen bytes: a GIF whose logical screen is width x height, with one 1x1 image in it."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
            + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00" + b";")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 13000) -> bytes:
    """A 1-bit PNG of side x side (169 megapixels at 13000) that compresses to about 20 KB."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def dds_bytes() -> bytes:
    """155 bytes of DDS with a pixel format Pillow's DDS plugin does not implement."""
    pixel_format = struct.pack("<II4sIIIII", 32, 0x4, b"ZZZZ", 0, 0, 0, 0, 0)
    header = struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + b"\0" * 44 + pixel_format + struct.pack("<5I", 0x1000,
                                                                                                       0, 0, 0, 0)
    return b"DDS " + header + b"\0" * 27


def static_video(path: str, frames: int = 420, width: int = 480, height: int = 270, fps: int = 30) -> str:
    """One gray picture repeated: a long video in a few KB."""
    import av

    container = av.open(path, "w")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    picture = av.VideoFrame.from_ndarray(np.full((height, width, 3), 90, np.uint8), format="rgb24")
    for _ in range(frames):
        for packet in stream.encode(picture):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def conv(block: dict) -> list:
    return [{"role": "user", "content": [block, {"type": "text", "text": "?"}]}]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    paths = {"gif": folder / "canvas.gif", "png": folder / "huge.png", "dds": folder / "x.dds"}
    paths["gif"].write_bytes(gif_canvas_bomb())
    paths["png"].write_bytes(png_bomb())
    paths["dds"].write_bytes(dds_bytes())
    Image.new("RGB", (1, 1), (5, 6, 7)).save(folder / "one.png")
    paths["one"] = folder / "one.png"
    paths["static"] = static_video(str(folder / "static.mp4"))
    paths["short"] = write_video(str(folder / "short.mp4"), 12, fps=10)
    return {k: str(v) for k, v in paths.items()}


# ---------------------------------------------------------------------------- bombs
def test_sizes_of_the_hostile_files(media):
    assert os.path.getsize(media["gif"]) < 40 and os.path.getsize(media["png"]) < 25_000
    assert os.path.getsize(media["static"]) < 40_000 and len(dds_bytes()) == 155


def test_gif_canvas_bomb_refused_from_its_header(processor, media):
    with pytest.raises(MediaLimitError, match=r"video #0 \(.*canvas\.gif\): 7568x32784 video frames .*"
                                              r"max_frame_pixels=36000000"):
        processor.apply_chat_template(conv({"type": "video", "video": media["gif"]}), **TOK)
    with pytest.raises(MediaLimitError, match=r"image #0 .*max_image_pixels=50000000"):
        processor.apply_chat_template(conv({"type": "image", "image": media["gif"]}), **TOK)
    with pytest.raises(MediaLimitError, match=r"8000x7000 image \(56000000 pixels\) is over max_image_pixels=50000000"):
        load_image(gif_canvas_bomb(8000, 7000))  # under Pillow's own bomb limit: ours refuses it


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns at open, then we refuse
def test_pixel_bomb_png_refused_before_decoding(processor, media):
    with pytest.raises(MediaLimitError, match=r"13000x13000 image \(169000000 pixels\) is over max_image_pixels"):
        processor.apply_chat_template(conv({"type": "image", "image": media["png"]}), **TOK)
    small = MediaLimits(max_image_pixels=1000)
    with pytest.raises(MediaLimitError, match=r"40x40 image \(1600 pixels\) is over max_image_pixels=1000"):
        load_image(png_bomb(40), limits=small)
    assert load_image(Image.new("RGB", (40, 40)), limits=small).size == (40, 40)  # decoded already: taken as is


def test_dds_and_other_formats_are_decode_errors(processor, media):
    with pytest.raises(MediaDecodeError, match=r"image #0 .*not a readable image .*accepted: PNG, JPEG"):
        processor.apply_chat_template(conv({"type": "image", "image": media["dds"]}), **TOK)
    with pytest.raises(MediaDecodeError):
        load_image(dds_bytes())


def test_static_video_keeps_a_bounded_number_of_frames(processor, media):
    out = processor.apply_chat_template(conv({"type": "video", "video": media["static"], "num_frames": 5000}), **TOK)
    assert out["video_grid_thw"][0, 0].item() == 768 // 2  # num_frames clamped to max_frames
    assert len(out.video_metadata[0]["frames_indices"]) == 768
    strict = Processor(processor.tokenizer, processor.image_params, processor.video_params, processor.chat_template,
                       MediaLimits(max_frames=16))
    out = strict.apply_chat_template(conv({"type": "video", "video": media["static"], "fps": 30}), **TOK)
    assert out["video_grid_thw"][0, 0].item() == 8  # the fps sampler's 420 frames thinned to 16
    assert len(out.video_metadata[0]["frames_indices"]) == 16


def test_decoding_stops_at_the_request_deadline(media):
    limits = MediaLimits(request_deadline_s=0.05)
    with pytest.raises(MediaLimitError, match=r"video #2 .*outlasted request_deadline_s=0\.05"):
        load_video(media["static"], lambda total, fps: list(range(total)), index=2, limits=limits,
                   deadline=time.monotonic() - 1)


def test_frame_counts_bounded(media):
    clip = load_video(media["short"], lambda total, fps: list(range(total)) * 100, limits=MediaLimits(max_frames=10))
    assert len(clip.indices) == 10 and clip.frames.shape[0] == 10
    with pytest.raises(MediaLimitError, match=r"20 frames given, over max_frames=10"):
        load_video([Image.new("RGB", (8, 8))] * 20, None, limits=MediaLimits(max_frames=10))


def test_video_size_after_resizing_bounded(processor, media):
    strict = Processor(processor.tokenizer, processor.image_params, processor.video_params, processor.chat_template,
                       MediaLimits(max_frames=8, max_option_pixels=1 << 20))
    block = {"type": "video", "video": media["short"], "num_frames": 8, "min_pixels": 1 << 20}
    with pytest.raises(MediaLimitError, match=r"video #0 .*8 frames of .* over max_frames x max_option_pixels=8388608"):
        strict.apply_chat_template(conv(block), **TOK)


def test_media_counts(processor):
    limited = Processor(processor.tokenizer, processor.image_params, processor.video_params, processor.chat_template,
                        MediaLimits(max_images=1))
    blocks = [{"type": "image", "image": Image.new("RGB", (32, 32))} for _ in range(2)]
    with pytest.raises(MediaLimitError, match=r"image #1 .*2 images in one call, over max_images=1"):
        limited.apply_chat_template([{"role": "user", "content": blocks}], **TOK)


# ---------------------------------------------------------------------------- options
BAD_OPTIONS = [  # (kind, options, option named, bound named)
    ("image", {"min_pixels": 8e7}, "min_pixels", "max_option_pixels"),
    ("image", {"max_pixels": 0}, "max_pixels", "max_option_pixels"),
    ("image", {"max_pixels": -5}, "max_pixels", "max_option_pixels"),
    ("image", {"min_pixels": float("inf")}, "min_pixels", "max_option_pixels"),
    ("image", {"max_pixels": float("nan")}, "max_pixels", "max_option_pixels"),
    ("image", {"resized_height": float("inf"), "resized_width": 64}, "resized_height", "max_option_pixels"),
    ("image", {"resized_height": 8192, "resized_width": 8192}, "resized_height x resized_width", "max_option_pixels"),
    ("image", {"max_pixels": "lots"}, "max_pixels", "max_option_pixels"),
    ("video", {"fps": float("inf")}, "fps", "1000"),
    ("video", {"fps": 0}, "fps", "1000"),
    ("video", {"num_frames": 0}, "num_frames", ">= 1"),
    ("video", {"num_frames": float("inf")}, "num_frames", ">= 1"),
    ("video", {"total_pixels": 1e300}, "total_pixels", "max_frames x max_option_pixels"),
    ("video", {"total_pixels": -1}, "total_pixels", "max_frames x max_option_pixels"),
    ("video", {"max_pixels": -1}, "max_pixels", "max_option_pixels"),
    ("video", {"sample_fps": 1e-9}, "sample_fps", "1000"),
]


@pytest.mark.parametrize("kind, options, name, bound", BAD_OPTIONS,
                         ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in o.items())}" for k, o, _, _ in BAD_OPTIONS])
def test_out_of_range_options_refused(processor, media, kind, options, name, bound):
    source = media["one"] if kind == "image" else media["short"]
    with pytest.raises(MediaOptionError) as info:
        processor.apply_chat_template(conv({"type": kind, kind: source, **options}), **TOK)
    message = str(info.value)
    assert f"{kind} #0" in message and name in message and bound in message, message


def test_call_level_options_refused(processor, media):
    text = VIDEO_TEXT
    with pytest.raises(MediaOptionError, match=r"video #0 .*fps must be a positive finite number"):
        processor(text=[text], videos=[media["short"]], fps=float("inf"))
    with pytest.raises(MediaOptionError, match=r"video #1 .*sample_fps .* got -2"):
        processor(text=[text * 2], videos=[media["short"], media["short"]], fps=[2, -2])
    with pytest.raises(MediaOptionError, match=r"image #0 .*min_pixels"):
        processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[media["one"]], min_pixels=8e7)


def test_valid_options_unchanged(processor, media):
    out = processor.apply_chat_template(conv({"type": "video", "video": media["short"], "num_frames": 4.0,
                                              "total_pixels": 4 * 64 * 64}), **TOK)
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]


# ---------------------------------------------------------------------------- playlists
def _reader_watch(fifo: str, stop: threading.Event, opened: list) -> None:
    """Flags any reader of ``fifo``: opening a FIFO for writing without blocking works only then."""
    while not stop.is_set():
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.01)
            continue
        opened.append(True)
        os.close(fd)
        return


@pytest.mark.parametrize("name, text", [
    ("p.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n../outside.ts\n#EXT-X-ENDLIST\n"),
    ("disguised.mp4", "#EXTM3U\n#EXTINF:1.0,\n../outside.ts\n#EXT-X-ENDLIST\n"),
    ("list.txt", "ffconcat version 1.0\nfile ../outside.ts\n")])
def test_playlist_cannot_reach_outside_its_folder(processor, tmp_path, name, text):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    fifo = str(tmp_path / "outside.ts")
    os.mkfifo(fifo)
    (allowed / name).write_text(text)
    stop, opened = threading.Event(), []
    watcher = threading.Thread(target=_reader_watch, args=(fifo, stop, opened), daemon=True)
    watcher.start()
    try:
        with pytest.raises(UnsupportedMediaError, match=r"video #0 .*playlists and concat lists .* are refused"):
            processor.apply_chat_template(conv({"type": "video", "video": str(allowed / name)}), **TOK)
        data_url = "data:application/vnd.apple.mpegurl;base64," + base64.b64encode(text.encode()).decode()
        with pytest.raises(UnsupportedMediaError):
            processor.apply_chat_template(conv({"type": "video", "video": data_url}), **TOK)
        time.sleep(0.1)
    finally:
        stop.set()
        watcher.join()
    assert not opened, "something opened the file outside the allowed folder"


def test_format_whitelist_refuses_playlists_even_unsniffed(tmp_path):
    from qwen3vl.processor import media as media_module

    path = tmp_path / "p.m3u8"
    path.write_text("#EXTM3U\n#EXTINF:1.0,\n../outside.ts\n#EXT-X-ENDLIST\n")
    with pytest.raises(MediaDecodeError, match="not a readable video"):
        media_module._open_container(str(path), dict(kind="video", index=0, source=str(path)), MediaLimits(),
                                    time.monotonic() + 10)


# ---------------------------------------------------------------------------- memory
MEMORY_SCRIPT = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from PIL import Image
from qwen3vl.processor import MediaError, Processor

proc = Processor.from_pretrained(sys.argv[1])
cases = json.loads(sys.argv[2])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

def run(block):
    conv = [{"role": "user", "content": [block, {"type": "text", "text": "?"}]}]
    try:
        out = proc.apply_chat_template(conv, tokenize=True, return_dict=True)
        return "ok", sum(v.numel() * v.element_size() for k, v in out.items() if k.startswith("pixel"))
    except MediaError as exc:
        return type(exc).__name__, 0

run({"type": "video", "video": cases["warm"]["video"], "num_frames": 4})  # load FFmpeg, warm the allocator
run({"type": "image", "image": Image.new("RGB", (64, 64))})
for name, block in cases.items():
    base = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        peak_before = None
    except OSError:
        peak_before = status("VmHWM")
    start = time.perf_counter()
    result, output = run(block)
    peak = status("VmHWM")
    growth = peak - (base if peak_before is None else max(base, peak_before))
    print(json.dumps({"case": name, "result": result, "growth_mb": growth / 2**20, "output_mb": output / 2**20,
                      "seconds": time.perf_counter() - start}), flush=True)
"""


def test_hostile_inputs_peak_memory(processor_dir, media):
    one = media["one"]
    cases = {
        "warm": {"type": "video", "video": media["short"], "num_frames": 4},
        "gif canvas bomb as video": {"type": "video", "video": media["gif"]},
        "gif canvas bomb as image": {"type": "image", "image": media["gif"]},
        "169 MP png": {"type": "image", "image": media["png"]},
        "1x1 png, min_pixels 8e7": {"type": "image", "image": one, "min_pixels": 8e7},
        "static video, 420 frames": {"type": "video", "video": media["static"]},
        # many frames kept: a smaller pixel budget, since at the default one (25M pixels) the float32
        # output alone is about 250 MB (measured: +308 MB peak with 246 MB of output; before: +492 MB,
        # and +2 GB for num_frames 5000)
        "static video, fps 30, total_pixels 8M": {"type": "video", "video": media["static"], "fps": 30,
                                                  "total_pixels": 8 << 20},
        "static video, num_frames 5000, total_pixels 8M": {"type": "video", "video": media["static"],
                                                           "num_frames": 5000, "total_pixels": 8 << 20},
    }
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, processor_dir, json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == list(cases)
    for row in rows:
        print(f"{row['case']:48s} {row['result']:16s} +{row['growth_mb']:6.1f} MB peak RSS "
              f"(output {row['output_mb']:.1f} MB) {row['seconds']:.2f} s")
    expected = {"gif canvas bomb as video": "MediaLimitError", "gif canvas bomb as image": "MediaLimitError",
                "169 MP png": "MediaLimitError", "1x1 png, min_pixels 8e7": "MediaOptionError"}
    assert all(r["result"] == expected.get(r["case"], "ok") for r in rows), rows
    worst = max(rows[1:], key=lambda r: r["growth_mb"])
    print(f"worst: {worst['case']}: +{worst['growth_mb']:.1f} MB")
    assert worst["growth_mb"] < RSS_BUDGET_MB, worst


def test_frames_resized_as_decoded_match_the_batch_resize(processor, tmp_path):
    """Files and frame lists are resized frame by frame as they arrive; arrays in one batch: same bits."""
    from test_processor_dropin import decode_all, write_noise_video

    path = write_noise_video(str(tmp_path / "noise.mp4"), 12, 10, 97, 61)
    frames, _ = decode_all(path)  # (12, 61, 97, 3) uint8
    text = [VIDEO_TEXT]
    batch = processor(text=text, videos=[frames])["pixel_values_videos"]
    one_by_one = processor(text=text, videos=[path], num_frames=12)
    assert one_by_one.video_metadata[0]["frames_indices"] == list(range(12))
    assert torch.equal(one_by_one["pixel_values_videos"], batch)
    as_list = processor(text=text, videos=[[Image.fromarray(f) for f in frames]])["pixel_values_videos"]
    assert torch.equal(as_list, batch)
