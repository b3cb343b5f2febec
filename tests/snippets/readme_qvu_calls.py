# Source: QwenLM/Qwen3-VL, README.md at commit 96588727e44c78b25ba03ea03b8e12f7e64fd0da
#   (README.md as last changed by 9d8cefbf0617720addea1b46822fda49b9a1e8cc), lines 429-433,
#   section New qwen-vl-utils Usage, the process_vision_info calls.
# Runs: session readme_qwen_vl_utils, twice: after readme_qvu_image_messages and after readme_qvu_video_messages (it uses their messages and readme_qvu_images' import).
# The snippet has no import of its own: process_vision_info comes from readme_qvu_images, run before it.
# Substitutions: none (the code below is verbatim and runs as it is).
# ---- snippet (verbatim) ----
# for Qwen2.5VL, you can simply call 
images, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True)

# For Qwen3VL series, you should call 
images, videos, video_kwargs = process_vision_info(messages, image_patch_size=16, return_video_kwargs=True, return_video_metadata=True)
