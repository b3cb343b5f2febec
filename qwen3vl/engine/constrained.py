"""Grammar-constrained decoding (structured output) with llguidance.

A ``Constraint`` (JSON schema, any JSON object, or "one of these tools must be called") becomes
an llguidance grammar, compiled once per distinct constraint and copied per request (a copy is a
few microseconds). Before each sampling step the engine masks, in every constrained row, the
tokens the grammar forbids; after it, each row's matcher consumes the sampled token. Once the
grammar is complete only the stop tokens remain allowed, so a constrained request ends as soon
as its value does. JSON is compiled compact (", " and ": " separators, no free whitespace): a
model cannot loop on blank space.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace

import llguidance
import torch

from .errors import ConstraintError

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# byte value -> its 8 bits, least significant first: unpacks llguidance's little-endian bit words
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()  # (256, 8)
_executor: llguidance.LLExecutor | None = None


@dataclass(frozen=True)
class Constraint:
    """What a request's output must be. ``spec``: canonical JSON text (hashable, the cache key)."""

    kind: str  # "json_schema" | "json_object" | "tool_calls"
    spec: str = "{}"
    after_reasoning: bool = False  # a Thinking model: free until </think>, then "\n\n" and the value

    @classmethod
    def json_schema(cls, schema: dict) -> "Constraint":
        if not isinstance(schema, dict):
            raise ConstraintError("response_format.json_schema.schema", "must be a JSON object")
        return cls("json_schema", json.dumps(schema, sort_keys=True))

    @classmethod
    def json_object(cls) -> "Constraint":
        return cls("json_object")

    @classmethod
    def tool_calls(cls, tools: list[dict], parallel: bool = True) -> "Constraint":
        """At least one call (several with ``parallel``) of one of ``tools`` (OpenAI function specs)."""
        return cls("tool_calls", json.dumps({"tools": tools, "parallel": parallel}, sort_keys=True))


def request_constraint(tools: list | None = None, tool_choice=None, response_format: dict | None = None,
                       parallel_tool_calls: bool = True, thinking: bool = False) -> Constraint | None:
    """OpenAI request fields -> the request's constraint (None: free text). ``tool_choice``
    "required" or a named function forces calls; ``response_format`` json_object / json_schema
    forces a JSON value. Raises ConstraintError naming the field when they cannot be honoured."""
    forced = _forced_tools(tools, tool_choice)
    kind = "text" if response_format is None else (
        response_format.get("type") if isinstance(response_format, dict) else None)
    if kind not in ("text", "json_object", "json_schema"):
        raise ConstraintError("response_format", 'must be {"type": "text" | "json_object" | "json_schema", ...}')
    if forced is not None and kind != "text":
        raise ConstraintError("response_format", "cannot be combined with a forced tool_choice")
    if forced is not None:
        return replace(Constraint.tool_calls(forced, parallel_tool_calls), after_reasoning=thinking)
    if kind == "json_object":
        return Constraint("json_object", after_reasoning=thinking)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ConstraintError("response_format.json_schema", 'must be {"name": ..., "schema": {...}}')
        return replace(Constraint.json_schema(spec.get("schema", {})), after_reasoning=thinking)
    return None


def _forced_tools(tools: list | None, tool_choice) -> list | None:
    """The tools a call must be made to (None: calls are optional)."""
    if tool_choice in (None, "auto", "none"):
        return None
    if not tools:
        raise ConstraintError("tool_choice", "names a tool, but the request has no tools")
    if tool_choice == "required":
        return list(tools)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if name is None:
        raise ConstraintError("tool_choice", 'must be "none", "auto", "required" or '
                                             '{"type": "function", "function": {"name": ...}}')
    chosen = [t for t in tools if t.get("function", t).get("name") == name]
    if not chosen:
        raise ConstraintError("tool_choice", f"names the function {name!r}, which is not in tools")
    return chosen


def _schema(schema: dict) -> dict:
    return {**schema, "x-guidance": {**schema.get("x-guidance", {}), **_JSON_OPTIONS}}


def _call_schema(tool: dict) -> dict:
    function = tool.get("function", tool)
    params = function.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


class GrammarCache:
    """Per engine: the llguidance tokenizer (built once, ~1 s) and one compiled matcher per constraint."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: tuple[int, ...]):
        self._source, self.vocab_size, self._stop_ids = tokenizer, vocab_size, list(stop_ids)
        self._lltok = None
        self._tags = tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
        self._compiled: dict[Constraint, llguidance.LLMatcher] = {}
        self._lock = threading.Lock()  # requests are built in worker threads

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher for one request; raises ConstraintError if the constraint cannot compile."""
        with self._lock:
            pristine = self._compiled.get(constraint)
            if pristine is None:
                if self._lltok is None:
                    self._lltok = llguidance.LLTokenizer(self._source.to_json(), n_vocab=self.vocab_size,
                                                         eos_token=self._stop_ids)
                pristine = llguidance.LLMatcher(self._lltok, self._grammar(constraint), log_level=0)
                if pristine.is_error():
                    raise ConstraintError(constraint.kind, f"cannot be compiled: {pristine.get_error()[:300]}")
                self._compiled[constraint] = pristine
            return pristine.deep_copy()

    def _grammar(self, constraint: Constraint) -> str:
        """The constraint as a Lark grammar (JSON values through llguidance's ``%json``)."""
        spec = json.loads(constraint.spec)
        lead = '"\\n\\n"? ' if constraint.after_reasoning else ""  # what follows </think>
        if constraint.kind in ("json_schema", "json_object"):
            schema = _schema(spec if constraint.kind == "json_schema" else {"type": "object"})
            return llguidance.LLMatcher.grammar_from_lark(f"start: {lead}value\nvalue: %json {json.dumps(schema)}\n")
        if None in self._tags:
            raise ConstraintError("tool_choice", "needs <tool_call> tokens, which this tokenizer lacks")
        call = _schema({"anyOf": [_call_schema(t) for t in spec["tools"]]})
        repeat = ' ("\\n" tc)*' if spec["parallel"] else ""
        lark = (f"start: {lead}tc{repeat}\n"
                f'tc: <[{self._tags[0]}]> "\\n" call "\\n" <[{self._tags[1]}]>\n'
                f"call: %json {json.dumps(call)}\n")
        return llguidance.LLMatcher.grammar_from_lark(lark)


def apply_masks(logits: torch.Tensor, matchers: list) -> None:
    """Forbid, in place, each constrained row's disallowed tokens; ``matchers[i]`` None: row i is free.
    The masks are computed straight into one buffer (several rows in parallel)."""
    global _executor
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32  # one bit per token
    buf = torch.empty((len(rows), words), dtype=torch.int32)  # (R, W) bit words
    if len(rows) == 1:
        matchers[rows[0]].unsafe_compute_mask_ptr(buf.data_ptr(), words * 4)
    else:
        _executor = _executor or llguidance.LLExecutor()
        _executor.unsafe_compute_mask_ptr([(matchers[i], j) for j, i in enumerate(rows)], buf.data_ptr(),
                                          words * 4, len(rows))
    allowed = _BYTE_BITS[buf.view(torch.uint8).long()].flatten(1)[:, :vocab]  # (R, V) bool
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))


def advance(matchers: list, tokens: list[int]) -> None:
    """Each constrained row's matcher takes its sampled token."""
    for m, token in zip(matchers, tokens):
        if m is not None and not m.is_stopped():
            m.consume_token(token)


__all__ = ["Constraint", "GrammarCache", "request_constraint", "apply_masks", "advance"]
