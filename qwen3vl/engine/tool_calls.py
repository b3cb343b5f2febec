"""Tool calls in the Qwen3 (hermes) format, parsed as the text streams in.

The model writes a call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.
``ToolCallParser.feed`` turns each piece of output into answer text plus tool-call deltas, as the
OpenAI API streams them: first a delta with the call's ``id`` and ``name``, then fragments of its
``arguments`` (the JSON text exactly as the model wrote it, so the fragments concatenate to the
final ``arguments``). A call whose name comes second, or whose JSON only completes at
``</tool_call>``, is emitted in one delta once it closes. A block that is not a call (not JSON, no
string ``name``) stays in the answer text verbatim: malformed output is never an error.
Whitespace between and after calls is dropped. Every decision depends on the text seen so far
only, so any split of the output into pieces yields the same calls and text as one piece.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from .reasoning import partial_suffix

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_DECODER = json.JSONDecoder()
_WS = None  # a run of optional whitespace in a token pattern
_HEAD = (_WS, "{", _WS, '"name"', _WS, ":", _WS)
_ARGUMENT_KEYS = ((_WS, ",", _WS, '"arguments"', _WS, ":", _WS), (_WS, ",", _WS, '"parameters"', _WS, ":", _WS))
_NO_ARGUMENTS = (_WS, "}")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None    # set on a call's first delta, with its name
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolSplit:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


def _scan(text: str, pos: int, pattern: tuple) -> tuple[str, int]:
    """Match ``pattern`` (literals and optional-whitespace runs) at ``pos``: ("match", end),
    ("partial", pos) when the text ends inside a possible match, ("fail", pos) otherwise."""
    for token in pattern:
        if token is _WS:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos == len(text):  # more whitespace, or what follows it, may still come
                return "partial", pos
            continue
        piece = text[pos: pos + len(token)]
        if piece != token:
            return ("partial", pos) if token.startswith(piece) and pos + len(piece) == len(text) else ("fail", pos)
        pos += len(token)
    return "match", pos


def _json_string(text: str, pos: int) -> tuple[str, object, int]:
    """A JSON string at ``pos``: ("match", value, end) / ("partial", None, pos) / ("fail", None, pos)."""
    if pos >= len(text):
        return "partial", None, pos
    if text[pos] != '"':
        return "fail", None, pos
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        i = pos + 1
        while i < len(text) and text[i] != '"':
            i += 2 if text[i] == "\\" else 1
        return ("partial", None, pos) if i >= len(text) else ("fail", None, pos)
    return "match", value, end


class ToolCallParser:
    """``feed(text) -> ToolSplit`` per piece; ``finish() -> ToolSplit`` at the end of the output."""

    def __init__(self):
        self.calls: list[ToolCall] = []  # every call so far, arguments complete once closed
        self._state = "text"             # text | head | args | rest | tail | whole
        self._buf = ""                   # text not yet decided (the open block, or a held tail)
        self._head = ""                  # the call's text up to its name (for the "rest" state)
        self._value = -1                 # start of the arguments value in _buf (-1: not found yet)
        self._sent = 0                   # characters of the arguments value emitted
        self._after_call = False         # whitespace right after a call is dropped

    def feed(self, text: str) -> ToolSplit:
        out = ToolSplit()
        self._buf += text
        while getattr(self, f"_on_{self._state}")(out):
            pass
        return out

    def finish(self) -> ToolSplit:
        out = ToolSplit()
        if self._state == "text":
            out.content += self._buf.rstrip() if self.calls else self._buf
        elif self._state in ("head", "whole"):
            self._close_whole(self._buf, out)
        elif self._state == "rest":
            self._close_rest(self._buf, out)
        elif self._state == "args":
            self._finish_arguments(out)
        self._buf, self._state = "", "text"
        return out

    # ------------------------------------------------------------------ states (True: advance again)
    def _on_text(self, out: ToolSplit) -> bool:
        if self._after_call:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._after_call = False
        cut = self._buf.find(OPEN)
        if cut >= 0:
            out.content += self._buf[:cut]
            self._buf, self._state = self._buf[cut + len(OPEN):], "head"
            return True
        keep = partial_suffix(self._buf, OPEN)
        body = self._buf[: len(self._buf) - keep]
        if self.calls:  # trailing whitespace after calls is held: dropped if nothing follows
            keep += len(body) - len(body.rstrip())
        split = len(self._buf) - keep
        out.content += self._buf[:split]
        self._buf = self._buf[split:]
        return False

    def _on_head(self, out: ToolSplit) -> bool:
        how, pos = _scan(self._buf, 0, _HEAD)
        if how == "match":
            how, name, pos = _json_string(self._buf, pos)
        if how == "partial":
            return False
        if how == "fail":
            self._state = "whole"
            return True
        self.calls.append(ToolCall(name, ""))
        out.calls.append(ToolCallDelta(len(self.calls) - 1, self.calls[-1].id, name))
        self._head, self._buf, self._state = self._buf[:pos], self._buf[pos:], "args"
        self._value, self._sent = -1, 0
        return True

    def _on_args(self, out: ToolSplit) -> bool:
        if self._value < 0:
            results = [_scan(self._buf, 0, p) for p in _ARGUMENT_KEYS + (_NO_ARGUMENTS,)]
            match = next((r for r in results[:2] if r[0] == "match"), None)
            if match is not None:
                self._value = match[1]
            elif results[2][0] == "match":  # {"name": ...} with no arguments
                self._emit_arguments("{}", out)
                self._buf, self._state = self._buf[results[2][1]:], "tail"
                return True
            elif any(r[0] == "partial" for r in results):
                return False
            else:  # another layout: the call is read whole once it closes
                self._state = "rest"
                return True
        return self._stream_value(out)

    def _stream_value(self, out: ToolSplit) -> bool:
        region = self._buf[self._value:]
        closed = CLOSE in region
        bounded = region[: region.find(CLOSE)] if closed else region[: len(region) - partial_suffix(region, CLOSE)]
        container = region[:1] in ("{", "[")
        try:
            value, end = _DECODER.raw_decode(self._buf, self._value)
            complete = container or closed or end < len(self._buf)  # a number may still grow
        except json.JSONDecodeError:
            complete = False
        if complete:
            text = value if isinstance(value, str) else self._buf[self._value: end]
            self._emit_arguments(text[self._sent:], out)
            self._buf, self._state = self._buf[end:], "tail"
            return True
        if closed:  # not valid JSON: the model's text up to the close, as it wrote it
            self._emit_arguments(bounded[self._sent:], out)
            self._buf, self._state, self._after_call = region[len(bounded) + len(CLOSE):], "text", True
            return True
        if container:  # an unfinished object or array: everything so far belongs to it
            self._emit_arguments(bounded[self._sent:], out)
        return False

    def _finish_arguments(self, out: ToolSplit) -> None:
        """The output ended inside a call's arguments (no close tag)."""
        if self._value < 0:
            self._emit_arguments("{}", out)
            return
        self._buf += CLOSE  # what the close would have decided
        self._stream_value(out)

    def _emit_arguments(self, text: str, out: ToolSplit) -> None:
        if text:
            self._sent += len(text)
            self.calls[-1].arguments += text
            out.calls.append(ToolCallDelta(len(self.calls) - 1, arguments=text))

    def _on_tail(self, out: ToolSplit) -> bool:
        cut = self._buf.find(CLOSE)
        if cut < 0:
            return False
        self._buf, self._state, self._after_call = self._buf[cut + len(CLOSE):], "text", True
        return True

    def _on_rest(self, out: ToolSplit) -> bool:
        cut = self._buf.find(CLOSE)
        if cut < 0:
            return False
        self._close_rest(self._buf[:cut], out)
        self._buf, self._state, self._after_call = self._buf[cut + len(CLOSE):], "text", True
        return True

    def _close_rest(self, body: str, out: ToolSplit) -> None:
        """A named call in another layout: its arguments from the whole object, if it parses."""
        try:
            obj = json.loads(self._head + body)
        except json.JSONDecodeError:
            obj = None
        args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else {}
        self._emit_arguments(args if isinstance(args, str) else json.dumps(args, ensure_ascii=False), out)

    def _on_whole(self, out: ToolSplit) -> bool:
        cut = self._buf.find(CLOSE)
        if cut < 0:
            return False
        self._after_call = self._close_whole(self._buf[:cut], out, closed=True)
        self._buf, self._state = self._buf[cut + len(CLOSE):], "text"
        return True

    def _close_whole(self, body: str, out: ToolSplit, closed: bool = False) -> bool:
        """A block read in one piece: a call if it is a JSON object with a string name (-> True), else text."""
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("arguments", obj.get("parameters", {}))
            call = ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
            self.calls.append(call)
            out.calls.append(ToolCallDelta(len(self.calls) - 1, call.id, call.name, call.arguments))
            return True
        out.content += OPEN + body + (CLOSE if closed else "")
        return False


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The whole output at once -> (answer text, calls); the same as streaming it."""
    parser = ToolCallParser()
    first, last = parser.feed(text), parser.finish()
    return first.content + last.content, parser.calls


__all__ = ["ToolCall", "ToolCallDelta", "ToolCallParser", "ToolSplit", "parse_tool_calls", "OPEN", "CLOSE"]
