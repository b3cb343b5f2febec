# Source: QwenLM/Qwen3-VL, README.md at commit 96588727e44c78b25ba03ea03b8e12f7e64fd0da
#   (README.md as last changed by 9d8cefbf0617720addea1b46822fda49b9a1e8cc), lines 554-606,
#   section New qwen-vl-utils Usage > "Process Videos" (details), first block.
# Runs: session readme_qwen_vl_utils, after readme_qvu_calls.
# Substitutions made by tests/snippet_harness.py when it runs this file (the code below is verbatim):
#   "file:///path/to/frame1.jpg" -> file://{media}/frame1.jpg  97x61 JPEG (frames 1-4 likewise; overwritten by the snippet itself)
#   "file:///path/to/frame2.jpg" -> file://{media}/frame2.jpg
#   "file:///path/to/frame3.jpg" -> file://{media}/frame3.jpg
#   "file:///path/to/frame4.jpg" -> file://{media}/frame4.jpg
#   "file:///path/to/video1.mp4" -> file://{media}/video1.mp4  2 s, 25 fps, 97x61 (overwritten by the snippet itself)
#   "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen2-VL/space_woaudio.mp4" -> {http}/space_24.mp4  2 s, 24 fps, 34x200 H.264 (the messages that stay), loopback server
# ---- snippet (verbatim) ----
# Messages containing a images list as a video and a text query
messages = [
    {
        "role": "user",
        "content": [
            {
                "type": "video",
                "video": [
                    "file:///path/to/frame1.jpg",
                    "file:///path/to/frame2.jpg",
                    "file:///path/to/frame3.jpg",
                    "file:///path/to/frame4.jpg",
                ],
                'sample_fps':'1', # sample_fps: frame sampling rate (frames per second), used to determine timestamps for each frame
            },
            {"type": "text", "text": "Describe this video."},
        ],
    }
]

# Messages containing a local video path and a text query
messages = [
    {
        "role": "user",
        "content": [
            {
                "type": "video",
                "video": "file:///path/to/video1.mp4",
                "max_pixels": 360 * 420,
                "fps": 1.0,
            },
            {"type": "text", "text": "Describe this video."},
        ],
    }
]

# Messages containing a video url and a text query
messages = [
    {
        "role": "user",
        "content": [
            {
                "type": "video",
                "video": "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen2-VL/space_woaudio.mp4",
                "min_pixels": 4 * 32 * 32,
                "max_pixels": 256 * 32 * 32,
                "total_pixels": 20480 * 32 * 32,
            },
            {"type": "text", "text": "Describe this video."},
        ],
    }
]
