"""A request's output text -> reasoning, answer and tool calls, piece by piece.

``OutputFormat`` says what to look for: a Thinking checkpoint's reasoning (the output starts
inside ``<think>``) and, when the request offered tools, hermes tool calls in the answer. Tool
calls written inside the reasoning stay reasoning (they were thought about, not made), as vLLM
and SGLang treat them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .reasoning import ReasoningParser, Split
from .tool_calls import ToolCall, ToolCallDelta, ToolCallParser


@dataclass(frozen=True)
class OutputFormat:
    reasoning: bool = False   # the output starts inside the reasoning (a Thinking chat template)
    tool_calls: bool = False  # parse <tool_call> blocks out of the answer (the request offered tools)


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class OutputParser:
    def __init__(self, fmt: OutputFormat):
        self.reasoning = ReasoningParser() if fmt.reasoning else None
        self.tools = ToolCallParser() if fmt.tool_calls else None

    @property
    def calls(self) -> list[ToolCall]:
        return [] if self.tools is None else self.tools.calls

    def feed(self, text: str) -> Parsed:
        split = self.reasoning.feed(text) if self.reasoning is not None else Split(content=text)
        return self._answer(split, final=False)

    def finish(self) -> Parsed:
        split = self.reasoning.finish() if self.reasoning is not None else Split()
        return self._answer(split, final=True)

    def _answer(self, split: Split, final: bool) -> Parsed:
        if self.tools is None:
            return Parsed(split.content, split.reasoning)
        out = self.tools.feed(split.content)
        if final:
            last = self.tools.finish()
            out.content += last.content
            out.calls += last.calls
        return Parsed(out.content, split.reasoning, out.calls)


__all__ = ["OutputFormat", "OutputParser", "Parsed"]
