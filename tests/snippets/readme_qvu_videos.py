# Source: QwenLM/Qwen3-VL, README.md at commit 96588727e44c78b25ba03ea03b8e12f7e64fd0da
#   (README.md as last changed by 9d8cefbf0617720addea1b46822fda49b9a1e8cc), lines 614-662,
#   section New qwen-vl-utils Usage > "Process Videos" (details), second block.
# Runs: session readme_qwen_vl_utils, last.
# Reference half only: device_map="auto" is dropped when accelerate is not installed (transformers
#   requires it for any device_map; on a CPU-only machine "auto" means the CPU, where the model loads anyway).
# Substitutions made by tests/snippet_harness.py when it runs this file (the code below is verbatim):
#   "Qwen/Qwen3-VL-235B-A22B-Instruct" -> {moe}  the tiny random MoE checkpoint (released layout, greedy generation_config.json)
#   "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen2-VL/space_woaudio.mp4" -> {http}/space_vfr.mp4  ~45 s, variable frame rate around 10 fps, 97x61 H.264, loopback server
# ---- snippet (verbatim) ----
from transformers import AutoModelForImageTextToText, AutoProcessor
from qwen_vl_utils import process_vision_info

model = AutoModelForImageTextToText.from_pretrained(
    "Qwen/Qwen3-VL-235B-A22B-Instruct", dtype="auto", device_map="auto"
)

processor = AutoProcessor.from_pretrained("Qwen/Qwen3-VL-235B-A22B-Instruct")

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

text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
images, videos, video_kwargs = process_vision_info(messages, image_patch_size=16, return_video_kwargs=True, return_video_metadata=True)

# split the videos and according metadatas
if videos is not None:
    videos, video_metadatas = zip(*videos)
    videos, video_metadatas = list(videos), list(video_metadatas)
else:
    video_metadatas = None

# since qwen-vl-utils has resize the images/videos, \
# we should pass do_resize=False to avoid duplicate operation in processor!
inputs = processor(text=text, images=images, videos=videos, video_metadata=video_metadatas, return_tensors="pt", do_resize=False, **video_kwargs)
inputs = inputs.to(model.device)

# Inference: Generation of the output
generated_ids = model.generate(**inputs, max_new_tokens=128)
generated_ids_trimmed = [
    out_ids[len(in_ids) :] for in_ids, out_ids in zip(inputs.input_ids, generated_ids)
]
output_text = processor.batch_decode(
    generated_ids_trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False
)
print(output_text)
