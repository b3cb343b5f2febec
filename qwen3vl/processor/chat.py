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

from .errors import UnsupportedMediaError
from .options import IMAGE_KEYS, MEDIA_PART_TYPES, VIDEO_KEYS, parse_media_part, part_type


def load_chat_template(path: str) -> str | None:
    """The template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
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
    declared = part_type(block)  # before dropping None values: {"image": None} is still an image part
    block = {k: v for k, v in block.items() if v is not None}
    if declared in MEDIA_PART_TYPES and part_type(block) != declared:
        block["type"] = declared
    kind = part_type(block)
    media = parse_media_part(block)
    if media is not None and kind.endswith("_url"):  # OpenAI form -> Qwen form
        rest = {k: v for k, v in block.items() if k not in ("type", kind)}
        source = {} if media.source is None else {media.kind: media.source}
        return {**rest, "type": media.kind, **source, **media.options}
    if kind is not None:  # qwen-vl-utils allows {"image": ...} / {"video": ...} / {"text": ...}
        block["type"] = kind
    return block


# Names a message's reasoning may come under; templates read the first (as transformers aliases them).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def normalize_conversation(conversation) -> list[dict]:
    """Copy of the messages with None values dropped, content blocks in one form, and reasoning
    given as ``reasoning`` / ``thinking`` also under ``reasoning_content``."""
    messages = []
    for message in conversation:
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message.get("content"), list):
            message["content"] = [_normalize_block(b) for b in message["content"]]
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        messages.append(message)
    return messages


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_continuing(template: str, messages: list[dict], field: str = "content", **kwargs) -> str:
    """Render with the prompt cut right after the final message's ``field`` (its text is continued),
    as transformers' ``continue_final_message`` does: the text is tagged, rendered, cut at the tag."""
    if not messages or messages[-1].get(field) is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue')
    messages = [dict(m) for m in messages]
    final = messages[-1]
    fields = [f for f in REASONING_FIELDS if final.get(f) == final[field]] if field in REASONING_FIELDS else [field]
    value = final[field]
    if isinstance(value, list):
        block = next((b for b in reversed(value) if isinstance(b, dict) and "text" in b), None)
        if block is None:
            raise ValueError("continue_final_message is set but the final message has no text to continue")
        value = block["text"]
        final[field] = [dict(b, text=b["text"] + _CONTINUE_TAG) if b is block else b for b in final[field]]
    else:
        for name in fields:
            final[name] = final[name] + _CONTINUE_TAG
    text = render(template, messages, **kwargs)
    if value.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise ValueError("continue_final_message is set but the chat template drops part of the final message "
                         f"(it does not appear in the rendered prompt): {value.strip()[:80]!r}")
    cut = text.rindex(_CONTINUE_TAG.strip())
    return text[:cut] if text[cut: cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:cut].rstrip()


def extract_media(messages: list[dict]) -> list[MediaItem]:
    """Images and videos of a (normalised) conversation, in prompt order."""
    items = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            media = parse_media_part(block) if isinstance(block, dict) else None
            if media is None:
                continue
            if media.source is None:
                keys = IMAGE_KEYS if media.kind == "image" else VIDEO_KEYS
                index = sum(i.kind == media.kind for i in items)
                raise UnsupportedMediaError(f"the content part names no source (one of the keys {list(keys)})",
                                            kind=media.kind, index=index)
            items.append(MediaItem(media.kind, media.source, media.options))
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


def opens_thinking(template: str | None, special_tokens: dict | None = None) -> bool:
    """A Thinking chat template: its generation prompt opens the reasoning (``...assistant\n<think>\n``)."""
    if not template:
        return False
    try:
        prompt = render(template, [{"role": "user", "content": "hi"}], add_generation_prompt=True,
                        special_tokens=special_tokens)
    except jinja2.TemplateError:
        return False
    return prompt.rstrip(" ").endswith("<think>\n")


__all__ = ["opens_thinking", "render_continuing", "REASONING_FIELDS", "MediaItem", "load_chat_template", "compile_template", "normalize_conversation", "extract_media",
           "is_batched", "render"]
