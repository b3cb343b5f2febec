"""OpenAI wire format: request validation, message conversion and response bodies.

Requests arrive as parsed JSON and are checked here by hand (not with pydantic models) so that every
rejection names the offending field the way the OpenAI API does (``param``). OpenAI chat messages
(``image_url`` / ``video_url`` parts) and Qwen-style parts (``{"type": "image", "image": ...}``)
become the message format of ``qwen3vl.Processor``; every media source passes ``MediaPolicy``
first, which refuses local files outside ``--allowed-local-media-path``. Sizes a client controls
(prompt characters, messages, media parts, stop strings, tools, choices) are bounded here against
``RequestLimits`` before any tokenizing or media work (see limits.py).
"""
from __future__ import annotations

import json
import os
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..processor.options import MEDIA_OPTIONS, parse_media_part, part_type
from .errors import ProtocolError, short
from .limits import (MAX_CHOICES, MAX_N, MAX_PROMPTS, MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS, MAX_TOKEN_ID,
                     MAX_TOOLS, RequestLimits)

ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI / vLLM request field -> SamplingParams field, with the JSON type each must have.
SAMPLING_FIELDS = {
    "temperature": ("temperature", "number"), "top_p": ("top_p", "number"), "top_k": ("top_k", "integer"),
    "min_p": ("min_p", "number"), "presence_penalty": ("presence_penalty", "number"),
    "frequency_penalty": ("frequency_penalty", "number"), "repetition_penalty": ("repetition_penalty", "number"),
    "seed": ("seed", "integer"), "min_tokens": ("min_new_tokens", "integer"),
    "stop_token_ids": ("stop_token_ids", "integer list"),
}
# SamplingParams field -> the request field a user wrote (for error messages).
FIELD_NAMES = {dst: src for src, (dst, _) in SAMPLING_FIELDS.items()} | {"max_new_tokens": "max_tokens"}


# ---------------------------------------------------------------------------- field checks
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(value: Any, kind: str, param: str) -> Any:
    ok = {"number": _is_number, "integer": _is_int, "boolean": lambda v: isinstance(v, bool),
          "string": lambda v: isinstance(v, str), "object": lambda v: isinstance(v, dict),
          "integer list": lambda v: isinstance(v, list) and all(_is_int(i) for i in v)}[kind](value)
    if not ok:
        raise ProtocolError(f"'{param}' must be {'an' if kind[0] in 'aeio' else 'a'} {kind}, "
                            f"got {type(value).__name__}", param)
    return value


def _optional(body: dict, name: str, kind: str) -> Any:
    value = body.get(name)
    return None if value is None else _check(value, kind, name)


# ---------------------------------------------------------------------------- media policy
@dataclass
class MediaPolicy:
    """Which media sources a request may name: data: and http(s) URLs always, local files only
    under ``allowed_dir`` (after resolving symlinks and ``..``)."""

    allowed_dir: str | None = None

    def __post_init__(self) -> None:
        if self.allowed_dir:
            self.allowed_dir = os.path.realpath(self.allowed_dir)

    def check(self, source: str, param: str) -> str:
        """The source to hand to the processor (local paths come back resolved)."""
        if source.startswith(("data:", "http://", "https://")):
            return source  # remote fetches have the media loader's timeout and size cap
        scheme = urllib.parse.urlparse(source).scheme
        if scheme == "file":
            path = urllib.parse.unquote(urllib.parse.urlparse(source).path)
        elif len(scheme) > 1:  # (one letter would be a Windows drive)
            raise ProtocolError(f"unsupported media URL scheme {short(scheme)}: use http(s)://, data: or file://",
                                param)
        else:
            path = source
        if not self.allowed_dir:
            raise ProtocolError("local media paths and file:// URLs are disabled on this server "
                                "(start it with --allowed-local-media-path DIR)", param, code="local_media_refused")
        # Relative paths are taken inside the allowed folder; symlinks and '..' are resolved before the check.
        real = os.path.realpath(os.path.join(self.allowed_dir, path))
        if os.path.commonpath([real, self.allowed_dir]) != self.allowed_dir:
            raise ProtocolError(f"local media path {short(path)} is outside the allowed media folder", param,
                                code="local_media_refused")
        return real


# ---------------------------------------------------------------------------- messages
def _media_part(part: dict, policy: MediaPolicy, param: str) -> dict:
    """An image / video part in any accepted form -> {"type": kind, kind: source, **options}."""
    media = parse_media_part(part)
    where = f"{param}.{media.key}"
    options = {k: _check(v, "number", f"{param}.{k}") for k, v in media.options.items()}
    source, kind = media.source, media.kind
    if kind == "video" and isinstance(source, list) and source:  # a video given as its frames
        frames = [policy.check(_check(f, "string", f"{where}[{i}]"), f"{where}[{i}]") for i, f in enumerate(source)]
        return {"type": "video", "video": frames, **options}
    if not isinstance(source, str) or not source:
        raise ProtocolError(f"'{where}' must be a non-empty string (http(s) URL or data: URI)", where)
    return {"type": kind, kind: policy.check(source, where), **options}


def _content_part(part: Any, policy: MediaPolicy, param: str) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise ProtocolError(f"'{param}' must be an object", param)
    ptype = part_type(part)
    if ptype == "text":
        return {"type": "text", "text": _check(part.get("text"), "string", f"{param}.text")}
    if ptype in ("image_url", "image", "video_url", "video"):
        return _media_part(part, policy, param)
    raise ProtocolError(f"unsupported content part type {short(ptype)} (supported: text, image_url, video_url, "
                        "image, video)", f"{param}.type")


def convert_messages(messages: Any, policy: MediaPolicy, max_messages: int | None = None) -> list[dict]:
    """OpenAI / Qwen chat messages -> the processor's message format (validated)."""
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("'messages' must be a non-empty array", "messages")
    if max_messages is not None and len(messages) > max_messages:
        raise ProtocolError(f"the request has {len(messages)} messages; at most {max_messages} fit in this model's "
                            "context", "messages", code="context_length_exceeded")
    out = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ProtocolError(f"'{param}' must be an object", param)
        role = msg.get("role")
        if role not in ROLES:
            raise ProtocolError(f"'{param}.role' must be one of {list(ROLES)}, got {short(role)}", f"{param}.role")
        content = msg.get("content")
        if content is None and role == "assistant":
            content = ""  # assistant turns that only carried tool calls
        if isinstance(content, list):
            content = [_content_part(p, policy, f"{param}.content[{j}]") for j, p in enumerate(content)]
        elif not isinstance(content, str):
            raise ProtocolError(f"'{param}.content' must be a string or an array of content parts", f"{param}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content, **_extras(msg, param)})
    return out


def _extras(msg: dict, param: str) -> dict:
    """A message's tool_calls / name / tool_call_id, checked (the chat template reads them)."""
    out = {}
    for key in ("name", "tool_call_id", "reasoning_content", "reasoning"):  # reasoning: either name
        if msg.get(key) is not None:
            out[key] = _check(msg[key], "string", f"{param}.{key}")
    calls = msg.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or len(calls) > MAX_TOOLS or not all(isinstance(c, dict) for c in calls):
            raise ProtocolError(f"'{param}.tool_calls' must be an array of at most {MAX_TOOLS} objects",
                                f"{param}.tool_calls")
        out["tool_calls"] = calls
    return out


def measure(messages: list[dict]) -> tuple[int, int, int]:
    """(text characters, images, videos) of converted messages; tool calls count as their JSON."""
    chars = images = videos = 0
    for msg in messages:
        parts = [msg["content"]] if isinstance(msg["content"], str) else msg["content"]
        for part in parts:
            if isinstance(part, str) or part["type"] == "text":
                chars += len(part if isinstance(part, str) else part["text"])
            elif part["type"] == "image":
                images += 1
            else:
                videos += 1
        chars += sum(len(msg.get(k, "")) for k in ("name", "tool_call_id"))
        if "tool_calls" in msg:
            chars += len(json.dumps(msg["tool_calls"], ensure_ascii=False))
    return chars, images, videos


# ---------------------------------------------------------------------------- request bodies
@dataclass
class GenerationRequest:
    """What both endpoints need once validated."""

    model: str | None
    sampling: dict                       # SamplingParams overrides
    max_tokens: int | None               # explicit completion budget, if any
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] = field(default_factory=list)   # chat
    prompts: list[str] = field(default_factory=list)     # completions
    mm_processor_kwargs: dict = field(default_factory=dict)
    template_kwargs: dict = field(default_factory=dict)
    constraint_kwargs: dict = field(default_factory=dict)  # tool_choice / response_format / parallel_tool_calls
    media: int = 0                                       # image and video parts (chat)


def _common(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object", None)
    for name in ("logprobs", "top_logprobs", "echo", "logit_bias"):
        if body.get(name):
            raise ProtocolError(f"'{name}' is not supported by this server", name)
    max_tokens = _optional(body, "max_completion_tokens", "integer")
    if max_tokens is None:
        max_tokens = _optional(body, "max_tokens", "integer")
    sampling = {dst: _optional(body, src, kind) for src, (dst, kind) in SAMPLING_FIELDS.items()}
    if sampling["seed"] is not None and not -2**63 <= sampling["seed"] < 2**64:
        raise ProtocolError("'seed' must fit in 64 bits", "seed")
    ids = sampling["stop_token_ids"]
    if ids is not None and (len(ids) > MAX_STOP_TOKEN_IDS or not all(0 <= i <= MAX_TOKEN_ID for i in ids)):
        raise ProtocolError(f"'stop_token_ids' must hold at most {MAX_STOP_TOKEN_IDS} token ids in "
                            f"[0, {MAX_TOKEN_ID}]", "stop_token_ids")
    if body.get("stop") is not None:
        sampling["stop"] = _stop(body["stop"])
    if max_tokens is not None:
        sampling["max_new_tokens"] = max_tokens
    n = _optional(body, "n", "integer")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise ProtocolError(f"'n' must be between 1 and {MAX_N}, got {n}", "n")
    stream = bool(_optional(body, "stream", "boolean"))
    options = _optional(body, "stream_options", "object") or {}
    include_usage = bool(options.get("include_usage")) and stream
    model = _optional(body, "model", "string")
    return dict(model=model, sampling={k: v for k, v in sampling.items() if v is not None},
                max_tokens=max_tokens, n=n, stream=stream, include_usage=include_usage)


def _stop(stop: Any) -> list[str]:
    """``stop`` as a list of non-empty strings, bounded: each is checked against every new token."""
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ProtocolError("'stop' must be a string or an array of strings", "stop")
    if len(stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ProtocolError(f"'stop' may hold at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters "
                            f"(got {len(stop)}, the longest {max(map(len, stop), default=0)})", "stop")
    return [s for s in stop if s]


def _tools(tools: Any) -> list:
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS or not all(isinstance(t, dict) for t in tools):
        raise ProtocolError(f"'tools' must be an array of at most {MAX_TOOLS} objects", "tools")
    return tools


def parse_chat_request(body: Any, policy: MediaPolicy, limits: RequestLimits) -> GenerationRequest:
    req = GenerationRequest(**_common(body))
    req.messages = convert_messages(body.get("messages"), policy, limits.max_messages)
    chars, images, videos = measure(req.messages)
    mm = _optional(body, "mm_processor_kwargs", "object") or {}
    for k, v in mm.items():
        if k not in MEDIA_OPTIONS:
            raise ProtocolError(f"unknown mm_processor_kwargs key {short(k)} (allowed: {list(MEDIA_OPTIONS)})",
                                f"mm_processor_kwargs.{k}")
        _check(v, "number", f"mm_processor_kwargs.{k}")
    req.mm_processor_kwargs = mm
    kwargs = _optional(body, "chat_template_kwargs", "object") or {}
    req.template_kwargs = {k: v for k, v in kwargs.items() if k in ("enable_thinking", "add_vision_id")}
    if body.get("tools") is not None:
        # rendered by the chat template (so they count as prompt text); calls come back as text
        req.template_kwargs["tools"] = _tools(body["tools"])
        chars += len(json.dumps(body["tools"], ensure_ascii=False))
    req.constraint_kwargs = _constraint_fields(body)
    limits.check_prompt_chars(chars, "messages")
    limits.check_media(images, videos)
    req.media = images + videos
    return req


def _constraint_fields(body: dict) -> dict:
    """tool_choice / response_format / parallel_tool_calls, shape-checked (the engine checks the rest)."""
    out = {}
    choice = body.get("tool_choice")
    if choice is not None:
        named = isinstance(choice, dict) and isinstance(choice.get("function"), dict) and isinstance(
            choice["function"].get("name"), str)
        if choice not in ("none", "auto", "required") and not named:
            raise ProtocolError("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                                '{"type": "function", "function": {"name": ...}}', "tool_choice")
        out["tool_choice"] = choice
    fmt = _optional(body, "response_format", "object")
    if fmt is not None:
        if fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ProtocolError("'response_format.type' must be \"text\", \"json_object\" or \"json_schema\"",
                                "response_format")
        out["response_format"] = fmt
    parallel = _optional(body, "parallel_tool_calls", "boolean")
    if parallel is not None:
        out["parallel_tool_calls"] = parallel
    return out


def parse_completion_request(body: Any, limits: RequestLimits) -> GenerationRequest:
    req = GenerationRequest(**_common(body))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) and p for p in prompt):
        raise ProtocolError("'prompt' must be a non-empty string or an array of non-empty strings", "prompt")
    if len(prompt) > MAX_PROMPTS or len(prompt) * req.n > MAX_CHOICES:
        raise ProtocolError(f"'prompt' may hold at most {MAX_PROMPTS} prompts, and prompts x n at most "
                            f"{MAX_CHOICES} (got {len(prompt)} x {req.n})", "prompt")
    for p in prompt:
        limits.check_prompt_chars(len(p), "prompt")
    req.prompts = prompt
    return req


# ---------------------------------------------------------------------------- response bodies
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_body(usages: list) -> dict:
    """OpenAI usage over the choices of one response (the prompt is counted once per prompt);
    ``prompt_tokens_details.cached_tokens``: prompt tokens the prefix cache supplied."""
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cached = sum(u.cached_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason


@dataclass
class ResponseHead:
    """id / created / model shared by a response and all its stream chunks."""

    id: str
    model: str
    object: str
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, choices: list, usage: dict | None, with_usage_key: bool = True) -> dict:
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
               "choices": choices}
        if with_usage_key:
            out["usage"] = usage
        return out


def chat_choice(index: int, message: dict, reason: str | None) -> dict:
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason(reason)}


def chat_chunk_choice(index: int, delta: dict, reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason(reason)}


def completion_choice(index: int, text: str, reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}
