"""qwen3vl: a self-contained implementation of the Qwen3-VL vision-language model family.

Public names (imported lazily so that, e.g., the processor works without building a model):
    Qwen3VL      the model (``from_pretrained``, ``from_config``, ``forward``, ``generate``)
    Processor    messages -> model inputs (images, videos, tokenizer, chat template)
    LLM          the generation engine (batching, streaming, chat)
Drop-in names for transformers / qwen-vl-utils code (``qwen3vl.engine.compat``):
    AutoProcessor, Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration,
    AutoModelForImageTextToText, process_vision_info
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Qwen3VL": ("qwen3vl.engine.hf", "Qwen3VL"),
    "Qwen3VLConfig": ("qwen3vl.config", "Qwen3VLConfig"),
    "Processor": ("qwen3vl.processor", "Processor"),
    "LLM": ("qwen3vl.engine.llm", "LLM"),
    "AutoProcessor": ("qwen3vl.engine.compat", "AutoProcessor"),
    "Qwen3VLForConditionalGeneration": ("qwen3vl.engine.compat", "Qwen3VLForConditionalGeneration"),
    "Qwen3VLMoeForConditionalGeneration": ("qwen3vl.engine.compat", "Qwen3VLMoeForConditionalGeneration"),
    "AutoModelForImageTextToText": ("qwen3vl.engine.compat", "AutoModelForImageTextToText"),
    "process_vision_info": ("qwen3vl.processor.vision_info", "process_vision_info"),
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qwen3vl' has no attribute {name!r}")
