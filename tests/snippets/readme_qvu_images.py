# Source: QwenLM/Qwen3-VL, README.md at commit 96588727e44c78b25ba03ea03b8e12f7e64fd0da
#   (README.md as last changed by 9d8cefbf0617720addea1b46822fda49b9a1e8cc), lines 484-543,
#   section New qwen-vl-utils Usage > "Process Images" (details), second block.
# Runs: first step of session readme_qwen_vl_utils.
# Reference half only: device_map="auto" is dropped when accelerate is not installed (transformers
#   requires it for any device_map; on a CPU-only machine "auto" means the CPU, where the model loads anyway).
# Substitutions made by tests/snippet_harness.py when it runs this file (the code below is verbatim):
#   "Qwen/Qwen3-VL-235B-A22B-Instruct" -> {moe}  the tiny random MoE checkpoint (released layout, greedy generation_config.json)
#   "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg" -> {http}/demo.jpeg  97x61 JPEG, loopback server
# ---- snippet (verbatim) ----
from transformers import AutoModelForImageTextToText, AutoProcessor
from qwen_vl_utils import process_vision_info

model = AutoModelForImageTextToText.from_pretrained(
    "Qwen/Qwen3-VL-235B-A22B-Instruct", dtype="auto", device_map="auto"
)

processor = AutoProcessor.from_pretrained("Qwen/Qwen3-VL-235B-A22B-Instruct")

# resized_height and resized_width
messages = [
    {
        "role": "user",
        "content": [
            {
                "type": "image",
                "image": "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg",
                "resized_height": 280,
                "resized_width": 420,
            },
            {"type": "text", "text": "Describe this image."},
        ],
    }
]

# min_pixels and max_pixels
messages = [
    {
        "role": "user",
        "content": [
            {
                "type": "image",
                "image": "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg",
                "min_pixels": 50176,
                "max_pixels": 50176,

            },
            {"type": "text", "text": "Describe this image."},
        ],
    }
]

# Preparation for inference with qwen-vl-utils
text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
images, videos = process_vision_info(messages, image_patch_size=16)

# since qwen-vl-utils has resize the images/videos, \
# we should pass do_resize=False to avoid duplicate operation in processor!
inputs = processor(text=text, images=images, videos=videos, do_resize=False, return_tensors="pt")
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
