"""Tools, structured output, reasoning and cached tokens through the official ``openai`` client.

The demo's random weights say nothing sensible; what is checked is the contract: a forced tool
call comes back as ``tool_calls`` whose arguments validate against the function's schema, a
``json_schema`` answer validates, streaming and non-streaming agree at temperature 0, a Thinking
checkpoint's output cut by ``max_tokens`` is all reasoning (``reasoning_content`` and
``reasoning``), and a chat's second turn reports the reused prompt tokens.
"""
from __future__ import annotations

import json
import os
import shutil

import jsonschema
import pytest

from test_server import ServerProcess, home  # noqa: F401

openai = pytest.importorskip("openai")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 9}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "tags"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
THINKING_TEMPLATE = os.path.join(os.path.dirname(__file__), "fixtures", "qwen3vl-configs", "Qwen3-VL-Thinking",
                                 "chat_template.jinja")


@pytest.fixture(scope="module")
def client(home):  # noqa: F811
    srv = ServerProcess(home)
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
    srv.stop()


@pytest.fixture(scope="module")
def thinking_client(home, tmp_path_factory):  # noqa: F811
    from qwen3vl.demo import demo_checkpoint

    path = str(tmp_path_factory.mktemp("thinking") / "ckpt")
    shutil.copytree(demo_checkpoint(), path)
    shutil.copy(THINKING_TEMPLATE, os.path.join(path, "chat_template.jinja"))
    srv = ServerProcess(home, "--model", path, "--served-model-name", "thinker")
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
    srv.stop()


def stream_collect(client, **kw):
    content, reasoning, calls, reason = "", "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or []:
            if call.id is not None:
                assert call.type == "function" and call.function.name and call.index not in calls
                calls[call.index] = [call.id, call.function.name, call.function.arguments or ""]
            else:
                calls[call.index][2] += call.function.arguments or ""
        reason = choice.finish_reason or reason
    return content, reasoning, [calls[i] for i in sorted(calls)], reason


def test_required_tool_call(client):
    kw = dict(model="qwen3vl-demo", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120,
              temperature=0)
    resp = client.chat.completions.create(**kw)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    content, _, calls, reason = stream_collect(client, **kw)
    assert (content, reason) == ("", "tool_calls")
    assert [c[1:] for c in calls] == [[c.function.name, c.function.arguments] for c in choice.message.tool_calls]


def test_json_schema_response(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    kw = dict(model="qwen3vl-demo", messages=ASK, response_format=fmt, max_tokens=120, temperature=0)
    resp = client.chat.completions.create(**kw)
    text = resp.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert stream_collect(client, **kw)[0] == text


def test_tool_conversation_and_bad_choices(client):
    """A full tool round trip is accepted (assistant tool_calls, tool results); bad choices are 400s."""
    turn = [*ASK, {"role": "assistant", "content": None, "reasoning_content": "check",
                   "tool_calls": [{"id": "call_1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    resp = client.chat.completions.create(model="qwen3vl-demo", messages=turn, tools=TOOLS, max_tokens=4)
    assert resp.choices[0].finish_reason in ("length", "stop", "tool_calls")
    for bad, param in (({"tool_choice": "sometimes"}, "tool_choice"),
                       ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                       ({"response_format": {"type": "xml"}}, "response_format")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="qwen3vl-demo", messages=ASK, tools=TOOLS, max_tokens=4, **bad)
        assert err.value.body["param"] == param


def test_second_turn_reports_cached_tokens(client):
    first = client.chat.completions.create(model="qwen3vl-demo", messages=ASK, max_tokens=6, temperature=0)
    turn = [*ASK, {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And tomorrow?"}]
    second = client.chat.completions.create(model="qwen3vl-demo", messages=turn, max_tokens=2, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens


def test_thinking_cut_is_all_reasoning(thinking_client):
    kw = dict(model="thinker", messages=ASK, max_tokens=8, temperature=0)
    message = thinking_client.chat.completions.create(**kw).choices[0].message
    extra = message.model_extra
    assert message.content == "" and extra["reasoning_content"] and extra["reasoning"] == extra["reasoning_content"]
    content, reasoning, _, reason = stream_collect(thinking_client, **kw)
    assert (content, reasoning, reason) == ("", extra["reasoning_content"], "length")
