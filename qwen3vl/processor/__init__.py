"""Qwen3-VL input processing: media loading, image/video preprocessing, tokenizer, chat template."""
from __future__ import annotations

from .errors import (EmptyMediaError, ImageSizeError, MediaDecodeError, MediaError, MediaFetchError,
                     MediaNotFoundError, UnsupportedMediaError)
from .processor import BatchFeature, Processor
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["Processor", "BatchFeature", "Tokenizer", "IncrementalDetokenizer", "MediaError", "MediaNotFoundError",
           "MediaFetchError", "MediaDecodeError", "EmptyMediaError", "UnsupportedMediaError", "ImageSizeError"]
