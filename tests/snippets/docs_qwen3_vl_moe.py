# Source: huggingface/transformers, docs/source/en/model_doc/qwen3_vl_moe.md at commit
#   1cc9c615b99c89d22e7ad1d0cc986cf3a26e40ea (newest stored version: documents Qwen3VLMoeVisionConfig,
#   as 5.23 has; the older 9b7f191a version passed dtype=torch.float16 too),
#   section "Model usage" (hfoption AutoModel).
# Runs: session standalone, in a namespace of its own.
# Reference half only: device_map="auto" is dropped when accelerate is not installed (transformers
#   requires it for any device_map; on a CPU-only machine "auto" means the CPU, where the model loads anyway).
# Substitutions made by tests/snippet_harness.py when it runs this file (the code below is verbatim):
#   "Qwen/Qwen3-VL-Moe" -> {moe}  the tiny random MoE checkpoint (released layout, greedy generation_config.json)
#   "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg" -> {http}/pipeline-cat-chonk.jpeg  320x213 JPEG, loopback server
# ---- snippet (verbatim) ----
import torch
from transformers import Qwen3VLMoeForConditionalGeneration, AutoProcessor

model = Qwen3VLMoeForConditionalGeneration.from_pretrained(
    "Qwen/Qwen3-VL-Moe",
    device_map="auto",
    attn_implementation="sdpa"
)
processor = AutoProcessor.from_pretrained("Qwen/Qwen3-VL-Moe")
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
