"""Bounds on what one request may ask for, checked while validating it (before any tokenizing,
templating or media work), so that no client-controlled size is unbounded.

The prompt is measured in characters before it is tokenized: tokenizing costs time and memory per
character (16 MB of text took 13 s and 2.3 GB), and the exact token count is only known after.
``CHARS_PER_TOKEN`` = 16: Qwen's byte-level BPE averages 3-5 characters per token on prose and
code and 1-2 on CJK text, so a prompt over ``16 x max_model_len`` characters would not fit anyway
unless it were mostly long runs of one character (the vocabulary's longest tokens are up to 128
spaces or dashes). At the default 8192-token context that is 131,072 characters, which tokenize
in well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ProtocolError

CHARS_PER_TOKEN = 16
MIN_TOKENS_PER_MESSAGE = 4   # the chat template's own tokens around each message (<|im_start|>role\n...<|im_end|>\n)
MAX_N = 16                   # choices per request
MAX_PROMPTS = 16             # prompts in one /v1/completions request
MAX_CHOICES = 64             # prompts x n: engine requests made from one HTTP request
MAX_STOP = 16                # stop strings (OpenAI allows 4), each checked against every new token
MAX_STOP_CHARS = 256         # characters of one stop string
MAX_STOP_TOKEN_IDS = 64
MAX_TOKEN_ID = 2**31 - 1
MAX_TOOLS = 128              # tools, and tool calls of one message (OpenAI's tool limit)
# A video token covers a 32 x 32 pixel square over 2 frames (merge 2 x 2 patches of 16, temporal
# pair): t x h x w pixels per token. The checkpoint's own video budget (25M pixels: 24,576 tokens,
# 300 MB as float32) would not fit the context anyway; the server lowers it to a quarter of the context.
VIDEO_PIXELS_PER_TOKEN = 32 * 32 * 2


def fit_video_budget(video_processor, max_model_len: int) -> int | None:
    """Lower the video processor's t x h x w budget to a quarter of the context (room for the
    conversation, and a bounded float32 copy); the new budget, or None if the checkpoint's was lower."""
    budget = max(video_processor.min_pixels, max_model_len // 4 * VIDEO_PIXELS_PER_TOKEN)
    if video_processor.max_pixels <= budget:
        return None
    video_processor.max_pixels = budget
    return budget


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int
    max_images: int | None = None   # image parts per request (None: no limit)
    max_videos: int | None = None

    @property
    def max_prompt_chars(self) -> int:
        return CHARS_PER_TOKEN * self.max_model_len

    @property
    def max_messages(self) -> int:
        return max(1, self.max_model_len // MIN_TOKENS_PER_MESSAGE)

    def check_prompt_chars(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise ProtocolError(
                f"the prompt has {chars} characters; this model's maximum context length is {self.max_model_len} "
                f"tokens, so at most {self.max_prompt_chars} characters ({CHARS_PER_TOKEN} per token) are accepted",
                param, code="context_length_exceeded")

    def check_media(self, images: int, videos: int) -> None:
        for kind, count, limit in (("image", images, self.max_images), ("video", videos, self.max_videos)):
            if limit is not None and count > limit:
                raise ProtocolError(f"the request has {count} {kind}s; this server accepts at most {limit} per request "
                                    "(its --limit-mm-per-prompt)", "messages", code="too_many_media")
