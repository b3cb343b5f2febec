# Source: QwenLM/Qwen3-VL, README.md at commit 96588727e44c78b25ba03ea03b8e12f7e64fd0da
#   (README.md as last changed by 9d8cefbf0617720addea1b46822fda49b9a1e8cc), lines 753-760,
#   section More Usage Tips > "Flash-Attention 2 to speed up generation".
# Runs: session standalone, in a namespace of its own; twice: verbatim, then variant sdpa.
# Variant sdpa (second run): "flash_attention_2" -> "sdpa" (flash-attn is a CUDA-only package: both
#   implementations refuse the verbatim call here, each with its own error).
# Substitutions made by tests/snippet_harness.py when it runs this file (the code below is verbatim):
#   "Qwen/Qwen3-VL-235B-A22B-Instruct" -> {moe}  the tiny random MoE checkpoint (released layout, greedy generation_config.json)
# ---- snippet (verbatim) ----
import torch
from transformers import AutoModelForImageTextToText

model = AutoModelForImageTextToText.from_pretrained(
    "Qwen/Qwen3-VL-235B-A22B-Instruct", 
    torch_dtype=torch.bfloat16, 
    attn_implementation="flash_attention_2",
)
