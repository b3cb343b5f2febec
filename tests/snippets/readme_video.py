# Source: QwenLM/Qwen3-VL, README.md at commit 96588727e44c78b25ba03ea03b8e12f7e64fd0da
#   (README.md as last changed by 9d8cefbf0617720addea1b46822fda49b9a1e8cc), lines 252-284,
#   section Quickstart > "Video inference" (details).
# Runs: session readme_transformers, after readme_multi_image.
# Substitutions made by tests/snippet_harness.py when it runs this file (the code below is verbatim):
#   "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen2-VL/space_woaudio.mp4" -> {http}/space_2997.mp4  10 s, 29.97 fps, 97x61 H.264, loopback server
# ---- snippet (verbatim) ----
# Messages containing a video url(or a local path) and a text query
messages = [
    {
        "role": "user",
        "content": [
            {
                "type": "video",
                "video": "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen2-VL/space_woaudio.mp4",
            },
            {"type": "text", "text": "Describe this video."},
        ],
    }
]

# Preparation for inference
inputs = processor.apply_chat_template(
    messages,
    tokenize=True,
    add_generation_prompt=True,
    return_dict=True,
    return_tensors="pt"
)
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
