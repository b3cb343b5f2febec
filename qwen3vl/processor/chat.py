"""Chat messages -> prompt text: message normalisation and the checkpoint's jinja2 chat template.

Rendering follows the reference's semantics: a sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, a ``tojson`` filter that does not HTML-escape, ``raise_exception``,
``strftime_now`` and ``namespace``; extra keyword arguments reach the template as variables.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

IMAGE_KEYS = ("image", "url", "path", "base64")
VIDEO_KEYS = ("video", "url", "path")
# per-item options a content block may carry (qwen-vl-utils names)
IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = ("fps", "num_frames", "min_pixels", "max_pixels", "total_pixels", "resized_height",
                 "resized_width", "sample_fps")


def load_chat_template(path: str) -> str | None:
    """The template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        return open(jinja_path, encoding="utf-8").read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            template = json.load(open(file, encoding="utf-8")).get("chat_template")
            if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
                template = {t["name"]: t["template"] for t in template}
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                return template
    return None


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# ---------------------------------------------------------------------------- messages
@dataclass
class MediaItem:
    kind: str                      # "image" or "video"
    source: object                 # path/URL/data URL/PIL/array/list of frames
    options: dict = field(default_factory=dict)


def is_batched(conversation) -> bool:
    """A list of conversations (rather than one list of messages)."""
    return isinstance(conversation, (list, tuple)) and len(conversation) > 0 and isinstance(
        conversation[0], (list, tuple))


def _normalize_block(block) -> dict:
    """One content block -> HF/Qwen form ({"type": "image"|"video"|"text", ...})."""
    if isinstance(block, str):
        return {"type": "text", "text": block}
    block = {k: v for k, v in block.items() if v is not None}
    kind = block.get("type")
    if kind in ("image_url", "video_url") and kind in block:  # OpenAI form
        info = block.pop(kind)
        url = info.get("url", "") if isinstance(info, dict) else info
        new = {"type": kind[:-4], "url": url}
        if isinstance(info, dict):
            new.update({k: v for k, v in info.items() if k in VIDEO_OPTIONS and v is not None})
        new.update({k: v for k, v in block.items() if k != "type"})
        return new
    if kind is None:  # qwen-vl-utils allows {"image": ...} / {"video": ...} / {"text": ...}
        for candidate in ("image", "video", "text"):
            if candidate in block:
                block["type"] = candidate
                break
    return block


def normalize_conversation(conversation) -> list[dict]:
    """Copy of the messages with None values dropped and content blocks in one form."""
    messages = []
    for message in conversation:
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message.get("content"), list):
            message["content"] = [_normalize_block(b) for b in message["content"]]
        messages.append(message)
    return messages


def extract_media(messages: list[dict]) -> list[MediaItem]:
    """Images and videos of a (normalised) conversation, in prompt order."""
    items = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            kind = block.get("type")
            if kind == "image":
                keys, opts = IMAGE_KEYS, IMAGE_OPTIONS
            elif kind == "video":
                keys, opts = VIDEO_KEYS, VIDEO_OPTIONS
            else:
                continue
            for key in keys:
                if key in block:
                    items.append(MediaItem(kind, block[key], {o: block[o] for o in opts if o in block}))
    return items


def _plain(value):
    """What the template sees: JSON-like data; decoded media objects become inert markers."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = False, tools=None,
           documents=None, special_tokens: dict | None = None, **kwargs) -> str:
    """Render one normalised conversation to prompt text."""
    variables = {**(special_tokens or {}), **kwargs}
    return compile_template(template).render(
        messages=_plain(messages), tools=_plain(tools), documents=_plain(documents),
        add_generation_prompt=add_generation_prompt, **{k: _plain(v) for k, v in variables.items()})


__all__ = ["MediaItem", "load_chat_template", "compile_template", "normalize_conversation", "extract_media",
           "is_batched", "render"]
