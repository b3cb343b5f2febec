# Source: QwenLM/Qwen3-VL, README.md at commit 96588727e44c78b25ba03ea03b8e12f7e64fd0da
#   (README.md as last changed by 9d8cefbf0617720addea1b46822fda49b9a1e8cc), lines 292-332,
#   section Quickstart > "Batch inference" (details).
# Runs: session readme_transformers, after readme_video.
# Substitutions made by tests/snippet_harness.py when it runs this file (the code below is verbatim):
#   "file:///path/to/image1.jpg" -> file://{media}/image1.jpg  34x200 JPEG
#   "file:///path/to/image2.jpg" -> file://{media}/image2.jpg  301x199 JPEG
#   reference half: "file:///path/to/image1.jpg" -> {media}/image1.jpg  (plain path, see below)
#   reference half: "file:///path/to/image2.jpg" -> {media}/image2.jpg  (plain path, see below)
#     transformers 5.23 refuses file:// image URLs ("ValueError: Incorrect image source. Must be a valid URL
#     starting with `http://` or `https://`, a valid path to an image file, or a base64 encoded string"), so its
#     half gets the plain path; the qwen3vl half keeps the file:// URL.
# ---- snippet (verbatim) ----
# for batch generation, padding_side should be set to left!
processor.tokenizer.padding_side = 'left'

# Sample messages for batch inference
messages1 = [
    {
        "role": "user",
        "content": [
            {"type": "image", "image": "file:///path/to/image1.jpg"},
            {"type": "image", "image": "file:///path/to/image2.jpg"},
            {"type": "text", "text": "What are the common elements in these pictures?"},
        ],
    }
]
messages2 = [
    {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
    {"role": "user", "content": [{"type": "text", "text": "Who are you?"}]},
]
# Combine messages for batch processing
messages = [messages1, messages2]

# Preparation for inference
inputs = processor.apply_chat_template(
    messages,
    tokenize=True,
    add_generation_prompt=True,
    return_dict=True,
    return_tensors="pt",
    padding=True # padding should be set for batch generation!
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
