"""Media requests at the largest sizes the server's default limits let through (a 1080p image;
a 1080p video at the frame cap): answered, with the server's peak RSS growth under the bound
of test_server_hardening (300 MB on the demo model).

The server is warmed up with one small image first: the first media request of a process pays a
one-time ~100 MB (the vision path's first allocations in the engine thread's malloc arena), which
later requests reuse; the bound is on what each request adds after that.
"""
from __future__ import annotations

import pytest

from test_server import ServerProcess, _post, home  # noqa: F401
from test_server_hardening import GROWTH, _status_kb, chat, peak_growth, url


@pytest.fixture(scope="module")
def server(home):  # noqa: F811
    srv = ServerProcess(home)  # the default limits
    assert _post(url(srv), chat()).status_code == 200  # warm up before taking the baseline
    small = {"type": "image_url", "image_url": {"url": _data_url(_png(64, 48, 0), "image/png")}}
    assert _post(url(srv), {"messages": [{"role": "user", "content": [small, {"type": "text", "text": "?"}]}],
                            "max_tokens": 2}).status_code == 200
    srv.baseline_kb = _status_kb(srv.proc.pid, "VmRSS")
    yield srv
    srv.stop()


def _data_url(data: bytes, mime: str) -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _png(width: int, height: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _mp4_1080p(frames: int) -> bytes:
    """A compressible 1080p clip (moving gradient), H.264 in memory."""
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        ramp = np.tile(np.arange(1920, dtype=np.uint16)[None, :, None], (1080, 1, 3))
        for i in range(frames):
            image = ((ramp + 8 * i) % 256).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def test_media_within_default_limits_bounded(server):
    """The largest requests the default limits let through: a 1080p image; a 1080p video at the
    frame cap (its pixel budget lowered to a quarter of the context by the server)."""
    images = [{"type": "image_url", "image_url": {"url": _data_url(_png(1920, 1080, 1), "image/png")}}]
    with peak_growth(server, "a 1080p image"):
        r = _post(url(server), {"messages": [{"role": "user", "content": images + [{"type": "text", "text": "?"}]}],
                                "max_tokens": 2})
    assert r.status_code == 200, r.text
    video = {"type": "video_url", "video_url": {"url": _data_url(_mp4_1080p(60), "video/mp4")}, "num_frames": 32}
    with peak_growth(server, "1080p video, 32 frames"):
        r = _post(url(server), {"messages": [{"role": "user", "content": [video, {"type": "text", "text": "?"}]}],
                                "max_tokens": 2})
    assert r.status_code == 200, r.text
    print("\npeak RSS growth (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in GROWTH.items()))
