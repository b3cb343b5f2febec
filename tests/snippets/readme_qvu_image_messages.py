# Source: QwenLM/Qwen3-VL, README.md at commit 96588727e44c78b25ba03ea03b8e12f7e64fd0da
#   (README.md as last changed by 9d8cefbf0617720addea1b46822fda49b9a1e8cc), lines 444-474,
#   section New qwen-vl-utils Usage > "Process Images" (details), first block.
# Runs: session readme_qwen_vl_utils, after readme_qvu_images.
# Substitutions made by tests/snippet_harness.py when it runs this file (the code below is verbatim):
#   "file:///path/to/your/image.jpg" -> file://{media}/your_image.jpg  97x61 JPEG (this assignment is overwritten by the snippet itself)
#   "http://path/to/your/image.jpg" -> {http}/your_image.jpg  loopback server (overwritten by the snippet itself)
#   "data:image;base64,/9j/..." -> data:image;base64,{b64_jpeg}  a 61x97 JPEG, base64 (the messages that stay)
# ---- snippet (verbatim) ----
# You can directly insert a local file path, a URL, or a base64-encoded image into the position where you want in the text.
## Local file path
messages = [
    {
        "role": "user",
        "content": [
            {"type": "image", "image": "file:///path/to/your/image.jpg"},
            {"type": "text", "text": "Describe this image."},
        ],
    }
]
## Image URL
messages = [
    {
        "role": "user",
        "content": [
            {"type": "image", "image": "http://path/to/your/image.jpg"},
            {"type": "text", "text": "Describe this image."},
        ],
    }
]
## Base64 encoded image
messages = [
    {
        "role": "user",
        "content": [
            {"type": "image", "image": "data:image;base64,/9j/..."},
            {"type": "text", "text": "Describe this image."},
        ],
    }
]
