# Source: huggingface/transformers, docs/source/en/model_doc/qwen3_vl.md at commit
#   34de825520ff42f3bf328e7ab4ec39b5b0a73f94 (newest stored version; same code block in 02941f18),
#   section "Model usage" (hfoption AutoModel).
# Runs: session standalone, in a namespace of its own.
# Reference half only: device_map="auto" is dropped when accelerate is not installed (transformers
#   requires it for any device_map; on a CPU-only machine "auto" means the CPU, where the model loads anyway).
# Substitutions made by tests/snippet_harness.py when it runs this file (the code below is verbatim):
#   "Qwen/Qwen3-VL" -> {dense}  the tiny random dense checkpoint (released layout, greedy generation_config.json)
#   "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg" -> {http}/pipeline-cat-chonk.jpeg  320x213 JPEG, loopback server
# ---- snippet (verbatim) ----
import torch
from transformers import Qwen3VLForConditionalGeneration, AutoProcessor

model = Qwen3VLForConditionalGeneration.from_pretrained(
    "Qwen/Qwen3-VL",
    dtype=torch.float16,
    device_map="auto",
    attn_implementation="sdpa"
)
processor = AutoProcessor.from_pretrained("Qwen/Qwen3-VL")
messages = [
    {
        "role":"user",
        "content":[
            {
                "type":"image",
                "url": "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg"
            },
            {
                "type":"text",
                "text":"Describe this image."
            }
        ]
    }

]

inputs = processor.apply_chat_template(
    messages,
    tokenize=True,
    add_generation_prompt=True,
    return_dict=True,
    return_tensors="pt",
)
inputs.pop("token_type_ids", None)

generated_ids = model.generate(**inputs, max_new_tokens=128)
generated_ids_trimmed = [
            out_ids[len(in_ids) :] for in_ids, out_ids in zip(inputs.input_ids, generated_ids)
]
output_text = processor.batch_decode(
       generated_ids_trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False
)
print(output_text)
