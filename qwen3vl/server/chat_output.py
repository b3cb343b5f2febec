"""Chat responses in the OpenAI wire format: reasoning, answer and tool calls.

A Thinking model's reasoning goes out as ``reasoning_content`` (SGLang, llama.cpp, mlx-vlm) and
``reasoning`` (vLLM since its rename) alike, in the final message and in stream deltas; models
without reasoning send neither key. Tool calls follow OpenAI: ``message.tool_calls`` with ``id``,
``type: "function"`` and ``function.name`` / ``function.arguments`` (a JSON string), the content
null when the model said nothing else, ``finish_reason: "tool_calls"``; streamed, a call's first
delta carries its index, id, type and name, later ones fragments of its arguments.
"""
from __future__ import annotations

from ..engine.api import ChatResult, Delta


def reasoning_fields(text: str) -> dict:
    return {"reasoning_content": text, "reasoning": text}


def message_body(result: ChatResult, thinking: bool) -> dict:
    """The ``message`` of one non-streamed choice."""
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in result.tool_calls]
    message = {"role": "assistant", "content": None if calls and not result.text else result.text}
    if thinking or result.reasoning:
        message.update(reasoning_fields(result.reasoning))
    if calls:
        message["tool_calls"] = calls
    return message


def delta_bodies(delta: Delta) -> list[dict]:
    """The ``delta`` objects one engine delta becomes (in order: reasoning, answer, tool calls)."""
    out = []
    if delta.reasoning:
        out.append(reasoning_fields(delta.reasoning))
    if delta.text:
        out.append({"content": delta.text})
    for call in delta.tool_calls:
        if call.id is not None:  # a call's first delta: who is called
            entry = {"index": call.index, "id": call.id, "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}
        else:
            entry = {"index": call.index, "function": {"arguments": call.arguments}}
        out.append({"tool_calls": [entry]})
    return out


__all__ = ["message_body", "delta_bodies", "reasoning_fields"]
