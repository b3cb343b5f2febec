"""Fuzzing the media decoders: mutated valid files (PNG, JPEG, GIF, WEBP, MP4 built here) and random
bytes go through ``load_image`` and the processor's video path; the only exceptions allowed out
are ``MediaError`` subclasses. Hypothesis drives it here on a fixed, small budget (derandomized,
no example database); ``bench/fuzz_media.py`` runs the same harness for longer.
"""
from __future__ import annotations

import base64
import io
import struct
import traceback
import zlib
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from processor_fixtures import processor, processor_dir  # noqa: F401
from qwen3vl.processor import MediaError, MediaLimits, Processor
from qwen3vl.processor.media import load_image

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
# mutated headers often claim sizes Pillow warns about before the limits refuse them
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

# Small bounds: a mutated header claiming a huge size is refused, not decoded, so examples stay quick
FUZZ_LIMITS = MediaLimits(max_image_pixels=4_000_000, max_frame_pixels=4_000_000, max_frames=16,
                          max_download_bytes=8 << 20, request_deadline_s=20.0)
VIDEO_TEXT = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_SEEDS = ("png", "jpeg", "gif", "webp")
VIDEO_SEEDS = ("mp4", "gif")
OPS = ("flip", "set", "insert", "delete", "truncate", "duplicate", "big")
INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00", b"\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x01\x00")


# ---------------------------------------------------------------------------- seeds
def _image_bytes(fmt: str, **kw) -> bytes:
    rng = np.random.default_rng(7)
    frames = [Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)) for _ in range(3)]
    buf = io.BytesIO()
    if fmt == "GIF":
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    elif fmt == "PNG":
        frames[0].convert("RGBA").save(buf, "PNG")
    else:
        frames[0].save(buf, fmt, **kw)
    return buf.getvalue()


def _mp4_bytes(frames: int = 8, size: int = 32) -> bytes:
    import av

    buf = io.BytesIO()
    container = av.open(buf, mode="w", format="mp4")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    stream = container.add_stream(codec, rate=Fraction(10))
    stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
    rng = np.random.default_rng(3)
    for _ in range(frames):
        picture = av.VideoFrame.from_ndarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), format="rgb24")
        for packet in stream.encode(picture):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return buf.getvalue()


def seed_files() -> dict[str, bytes]:
    """Small valid files of each fuzzed format."""
    return {"png": _image_bytes("PNG"), "jpeg": _image_bytes("JPEG", quality=80, progressive=True),
            "gif": _image_bytes("GIF"), "webp": _image_bytes("WEBP", quality=60), "mp4": _mp4_bytes()}


# ---------------------------------------------------------------------------- mutations
def mutate(data: bytes, ops) -> bytes:
    """Apply ``ops`` ((name, a, b) with a, b any non-negative ints) to ``data``: a deterministic
    function of its inputs, so Hypothesis can shrink and the benchmark can replay."""
    out = bytearray(data)
    for name, a, b in ops:
        if not out:
            break
        pos = a % len(out)
        if name == "flip":
            out[pos] ^= 1 << (b % 8)
        elif name == "set":
            out[pos] = b % 256
        elif name == "insert":
            out[pos:pos] = bytes((b >> (8 * k)) % 256 for k in range(1 + b % 8))
        elif name == "delete":
            del out[pos:pos + 1 + b % 64]
        elif name == "truncate":
            del out[max(pos, 1):]
        elif name == "duplicate":
            out[pos:pos] = out[pos:pos + 1 + b % 256]
        elif name == "big":  # header fields: sizes, counts, lengths
            value = INTERESTING[b % len(INTERESTING)]
            out[pos:pos + len(value)] = value
    return _fix_png_crcs(bytes(out))


def _fix_png_crcs(data: bytes) -> bytes:
    """Recompute PNG chunk checksums, so mutations reach the decoder instead of the CRC check."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, pos = bytearray(data), 8
    while pos + 12 <= len(out):
        length = struct.unpack(">I", out[pos:pos + 4])[0]
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(out[pos + 4:end])))
        pos = end + 4
    return bytes(out)


def ops_strategy(max_ops: int = 6):
    return st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
                    min_size=1, max_size=max_ops)


# ---------------------------------------------------------------------------- targets
class Unexpected(AssertionError):
    """An exception other than a MediaError escaped."""


def check_image(data: bytes) -> str:
    """Outcome of ``load_image`` on the bytes: "ok" or the MediaError's class name."""
    try:
        load_image(data, limits=FUZZ_LIMITS)
        return "ok"
    except MediaError as exc:
        return type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
        raise Unexpected(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}") from exc


def check_video(proc: Processor, data: bytes) -> str:
    """Outcome of the processor's video path (data: URL -> decode -> resize -> patches)."""
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    try:
        proc(text=[VIDEO_TEXT], videos=[url])
        return "ok"
    except MediaError as exc:
        return type(exc).__name__
    except Exception as exc:  # noqa: BLE001
        raise Unexpected(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}") from exc


def fuzz_processor(base: Processor) -> Processor:
    return Processor(base.tokenizer, base.image_params, base.video_params, base.chat_template, FUZZ_LIMITS)


# ---------------------------------------------------------------------------- tests (fixed budget)
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(hypothesis.HealthCheck))
SEEDS = seed_files()


def test_seeds_are_valid(processor):
    for name in IMAGE_SEEDS:
        assert check_image(SEEDS[name]) == "ok", name
    assert check_video(fuzz_processor(processor), SEEDS["mp4"]) == "ok"


@hypothesis.settings(max_examples=1500, **SETTINGS)
@hypothesis.given(seed=st.sampled_from(IMAGE_SEEDS), ops=ops_strategy())
def test_mutated_images(seed, ops):
    check_image(mutate(SEEDS[seed], ops))


@hypothesis.settings(max_examples=300, **SETTINGS)
@hypothesis.given(data=st.binary(min_size=1, max_size=2048))
def test_random_bytes_as_image(data):
    check_image(data)


def test_mutated_videos(processor):
    proc = fuzz_processor(processor)

    @hypothesis.settings(max_examples=800, **SETTINGS)
    @hypothesis.given(seed=st.sampled_from(VIDEO_SEEDS), ops=ops_strategy())
    def run(seed, ops):
        check_video(proc, mutate(SEEDS[seed], ops))

    run()


def test_random_bytes_as_video(processor):
    proc = fuzz_processor(processor)

    @hypothesis.settings(max_examples=200, **SETTINGS)
    @hypothesis.given(data=st.binary(min_size=1, max_size=2048))
    def run(data):
        check_video(proc, data)

    run()
