"""Constrained decoding, tool calls and reasoning through ``qwen3vl.LLM`` on the random demo weights.

Random weights say nothing sensible, so these check the contract: whatever the model samples,
a forced tool call parses and validates against the function's schema, a json_schema response
validates, a free request batched beside constrained ones decodes exactly as it does alone, and
streaming agrees with the one-shot result.
"""
from __future__ import annotations

import json
import os
import shutil

import jsonschema
import pytest

import qwen3vl
from qwen3vl.demo import demo_checkpoint
from qwen3vl.engine.constrained import Constraint, request_constraint
from qwen3vl.engine.errors import ConstraintError

HERE = os.path.dirname(__file__)
THINKING_TEMPLATE = os.path.join(HERE, "fixtures", "qwen3vl-configs", "Qwen3-VL-Thinking", "chat_template.jinja")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 9}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {},
                                                                          "additionalProperties": False}}}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "tags"], "additionalProperties": False}
HI = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def llm():
    return qwen3vl.LLM()


@pytest.fixture(scope="module")
def thinking_llm(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("thinking") / "ckpt")
    shutil.copytree(demo_checkpoint(), path)
    shutil.copy(THINKING_TEMPLATE, os.path.join(path, "chat_template.jinja"))
    return qwen3vl.LLM(path)


def check_calls(result, names):
    assert result.finish_reason == "tool_calls" and result.tool_calls
    for call in result.tool_calls:
        assert call.name in names and call.id.startswith("call_")
        tool = next(t["function"] for t in TOOLS if t["function"]["name"] == call.name)
        jsonschema.validate(json.loads(call.arguments), tool["parameters"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_call_validates(llm, seed):
    result = llm.chat(HI, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0, seed=seed)
    check_calls(result, {"get_weather", "noop"})


def test_named_tool_choice(llm):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    result = llm.chat(HI, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, max_tokens=120, temperature=0)
    check_calls(result, {"get_weather"})
    assert len(result.tool_calls) == 1


@pytest.mark.parametrize("seed", [0, 3])
def test_json_schema_response_validates(llm, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    result = llm.chat(HI, response_format=fmt, max_tokens=120, temperature=1.0, seed=seed)
    assert result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), PERSON)
    assert ": " in result.text or result.text.count(":") == 0  # compact separators, no free whitespace
    # Any object: random weights may ramble inside a free string until max_tokens, but never outside JSON.
    obj = llm.chat(HI, response_format={"type": "json_object"}, max_tokens=60, temperature=0)
    assert obj.text.startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)


def test_free_row_unchanged_beside_constrained_rows(llm):
    """A free request decodes the same tokens alone and batched with constrained requests."""
    alone = llm.chat(HI, max_tokens=16, temperature=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    reqs = [llm.request(HI, llm.sampling_params(max_tokens=16, temperature=0)),
            llm.request(HI, llm.sampling_params(max_tokens=16, temperature=0), response_format=fmt),
            llm.request(HI, llm.sampling_params(max_tokens=16, temperature=0), tools=TOOLS, tool_choice="required")]
    for r in reqs:
        llm.engine.submit(r)
    llm.engine.run_until_done(reqs)
    assert reqs[0].result.token_ids == alone.token_ids
    assert reqs[1].result.token_ids != alone.token_ids


def test_stream_agrees_with_chat(llm):
    kw = dict(tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0)
    result = llm.chat(HI, **kw)
    text, calls = "", {}
    for delta in llm.stream_chat(HI, **kw):
        text += delta.text
        for d in delta.tool_calls:
            calls.setdefault(d.index, [d.name, ""])[1] += d.arguments
    assert delta.result.finish_reason == result.finish_reason and text == result.text
    assert [calls[i] for i in sorted(calls)] == [[c.name, c.arguments] for c in result.tool_calls]


def test_auto_tools_parse_without_forcing(llm):
    result = llm.chat(HI, tools=TOOLS, max_tokens=12, temperature=0)
    plain = llm.chat(HI, tools=TOOLS, tool_choice="none", max_tokens=12, temperature=0)
    assert result.finish_reason in ("length", "stop", "tool_calls") and plain.tool_calls == []


def test_thinking_checkpoint_cut_is_all_reasoning(thinking_llm):
    assert thinking_llm.thinking and thinking_llm.sampling_params().temperature == 0.7  # the file's value wins
    result = thinking_llm.chat(HI, max_tokens=8, temperature=0)
    assert result.finish_reason == "length" and result.text == "" and result.reasoning
    streamed = [d for d in thinking_llm.stream_chat(HI, max_tokens=8, temperature=0)]
    assert "".join(d.reasoning for d in streamed) == result.reasoning
    assert "".join(d.text for d in streamed) == ""


def test_thinking_constraint_waits_for_the_reasoning(thinking_llm):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    req = thinking_llm.request(HI, thinking_llm.sampling_params(max_tokens=4, temperature=0), response_format=fmt)
    assert req.matcher is not None and req.live_matcher is None  # free while reasoning


def test_bad_constraints_are_typed_errors():
    with pytest.raises(ConstraintError, match="tool_choice.*no tools"):
        request_constraint(None, "required")
    with pytest.raises(ConstraintError, match="'missing', which is not in tools"):
        request_constraint(TOOLS, {"type": "function", "function": {"name": "missing"}})
    with pytest.raises(ConstraintError, match="response_format"):
        request_constraint(None, None, {"type": "xml"})
    with pytest.raises(ConstraintError, match="forced tool_choice"):
        request_constraint(TOOLS, "required", {"type": "json_object"})
    assert request_constraint(TOOLS, "auto") is None and request_constraint(None, None, {"type": "text"}) is None


def test_grammar_compiled_once_per_constraint(llm):
    cache = llm.engine.grammars
    a = cache.matcher(Constraint.json_schema(PERSON))
    before = len(cache._compiled)
    b = cache.matcher(Constraint.json_schema(dict(reversed(list(PERSON.items())))))  # same schema, other key order
    assert len(cache._compiled) == before and a is not b
    with pytest.raises(ConstraintError, match="json_schema"):
        cache.matcher(Constraint("json_schema", json.dumps({"type": "object", "properties": {"a": {"$ref": "#/x"}}})))
