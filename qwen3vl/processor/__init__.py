"""Qwen3-VL input processing: media loading, image/video preprocessing, tokenizer, chat template."""
from __future__ import annotations

from .errors import (EmptyMediaError, ForbiddenURLError, ImageSizeError, MediaDecodeError, MediaError,
                     MediaFetchError, MediaLimitError, MediaNotFoundError, MediaOptionError, UnsupportedMediaError)
from .components import ImageProcessor, VideoProcessor
from .limits import MediaLimits
from .processor import BatchFeature, Processor
from .tokenizer import IncrementalDetokenizer, Tokenizer
from .vision_info import process_vision_info

__all__ = ["Processor", "BatchFeature", "ImageProcessor", "VideoProcessor", "process_vision_info", "MediaLimits", "Tokenizer",
           "IncrementalDetokenizer", "MediaError", "MediaNotFoundError", "MediaFetchError",
           "MediaDecodeError", "EmptyMediaError", "UnsupportedMediaError", "ImageSizeError", "MediaLimitError",
           "MediaOptionError", "ForbiddenURLError"]
