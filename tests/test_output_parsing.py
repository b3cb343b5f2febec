"""Reasoning / tool-call parsing of a model's output (qwen3vl.engine.reasoning, .tool_calls, .output_parser).

The property every case is checked against: streaming the output cut at any character boundary (every
single cut, every pair of cuts, random multi-cuts) yields exactly what parsing it in one piece does
(reasoning, answer and each call's name and concatenated argument fragments), and a call's first
delta carries its id and name before any argument fragment.
"""
from __future__ import annotations

import json
import random

import pytest

from qwen3vl.engine.output_parser import OutputFormat, OutputParser
from qwen3vl.engine.reasoning import parse_reasoning
from qwen3vl.engine.tool_calls import parse_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
TOOL_CASES = {
    "plain": ("Hello world", "Hello world", []),
    "text then call": ("Let me check.\n" + CALL, "Let me check.\n",
                       [("get_weather", '{"city": "Paris", "days": 3}')]),
    "two calls": ('<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "</tool"}]}}\n</tool_call>\n'
                  '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>\n', "",
                  [("a", '{"x": [1, {"y": "</tool"}]}'), ("b", "{}")]),
    "arguments first": ('<tool_call>\n{"arguments": {"q": 1}, "name": "swap"}\n</tool_call>', "",
                        [("swap", '{"q": 1}')]),
    "not json": ("<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", []),
    "no name": ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    "no arguments": ('<tool_call>\n{"name": "f"}\n</tool_call>', "", [("f", "{}")]),
    "string arguments": ('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', "",
                         [("f", '{"a": 1}')]),
    "number arguments": ('<tool_call>\n{"name": "f", "arguments": 12}\n</tool_call>', "", [("f", "12")]),
    "broken arguments": ('<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>tail text  \n', "tail text",
                         [("f", '{"a": }\n')]),
    "unclosed at the end": ('<tool_call>\n{"name": "f", "arguments": {"a": 1', "", [("f", '{"a": 1')]),
    "extra key first": ('<tool_call>\n{"name": "f", "extra": 1, "arguments": {"a": 1}}\n</tool_call>', "",
                        [("f", '{"a": 1}')]),
    "partial tag at the end": ("x <tool_c", "x <tool_c", []),
    "unicode and text after": ('<tool_call>\n{"name": "f", "arguments": {"a": "é😀"}}\n</tool_call> and then\n\n',
                               "and then", [("f", '{"a": "é😀"}')]),
    "unclosed garbage": ("<tool_call>\nhello", "<tool_call>\nhello", []),
}
REASONING_CASES = {
    "closed": ("thinking here\n</think>\n\nAnswer", "thinking here", "Answer"),
    "self-opened": ("\n<think>\nhmm\n\n</think>\n\nA\n", "hmm", "A\n"),
    "cut by max_tokens": ("no close at all\n", "no close at all", ""),
    "empty": ("", "", ""),
    "empty reasoning": ("</think>x", "", "x"),
    "partial close": ("a</thin", "a</thin", ""),
    "inner newlines kept": ("a\n\nb</think>\n\n\nc\n\nd", "a\n\nb", "c\n\nd"),
}


def splits(text: str, seed: int = 0):
    """Every single cut, every pair of cuts, and 50 random 6-cut splits of ``text``."""
    n = len(text)
    for i in range(n + 1):
        yield [text[:i], text[i:]]
        for j in range(i, n + 1):
            yield [text[:i], text[i:j], text[j:]]
    rng = random.Random(seed)
    for _ in range(50):
        cuts = sorted(rng.sample(range(n + 1), min(n + 1, 6)))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [n])]


def run_stream(pieces: list[str], fmt: OutputFormat):
    parser = OutputParser(fmt)
    content, reasoning, calls = "", "", {}
    for parsed in [parser.feed(p) for p in pieces] + [parser.finish()]:
        content += parsed.content
        reasoning += parsed.reasoning
        for d in parsed.tool_calls:
            if d.index not in calls:
                assert d.id and d.name, "a call's first delta names it"
                calls[d.index] = [d.name, ""]
            else:
                assert d.id is None and d.name is None
            calls[d.index][1] += d.arguments
    assert [[c.name, c.arguments] for c in parser.calls] == [calls[i] for i in sorted(calls)]
    return content, reasoning, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("name", TOOL_CASES)
def test_tool_calls_any_split(name):
    text, content, calls = TOOL_CASES[name]
    whole, parsed = parse_tool_calls(text)
    assert (whole, [(c.name, c.arguments) for c in parsed]) == (content, calls)
    for pieces in splits(text):
        assert run_stream(pieces, OutputFormat(tool_calls=True)) == (content, "", calls), pieces


@pytest.mark.parametrize("name", REASONING_CASES)
def test_reasoning_any_split(name):
    text, reasoning, content = REASONING_CASES[name]
    split = parse_reasoning(text)
    assert (split.reasoning, split.content) == (reasoning, content)
    for pieces in splits(text):
        assert run_stream(pieces, OutputFormat(reasoning=True)) == (content, reasoning, []), pieces


def test_call_inside_reasoning_stays_reasoning():
    text = "I could call " + CALL + " maybe.\n</think>\n\nSure.\n" + CALL
    for pieces in splits(text, seed=1):
        content, reasoning, calls = run_stream(pieces, OutputFormat(reasoning=True, tool_calls=True))
        assert reasoning == "I could call " + CALL + " maybe."
        assert content == "Sure.\n" and calls == [("get_weather", '{"city": "Paris", "days": 3}')]


def test_arguments_stream_before_the_call_closes():
    parser = OutputParser(OutputFormat(tool_calls=True))
    head = parser.feed('<tool_call>\n{"name": "f", "arguments": {"text": "a long')
    assert [(d.name, d.arguments) for d in head.tool_calls] == [("f", ""), (None, '{"text": "a long')]
    more = parser.feed(' answer"}}\n</tool_call>')
    assert "".join(d.arguments for d in more.tool_calls) == ' answer"}'
    assert json.loads(parser.calls[0].arguments) == {"text": "a long answer"}


def test_random_garbage_never_raises():
    rng = random.Random(7)
    alphabet = ['<tool_call>', '</tool_call>', '</think>', '<think>', '{', '}', '"', '"name"', ':', ',',
                '"arguments"', '\n', ' ', 'x', '\\', '[', ']', '1']
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        expected = run_stream([text], OutputFormat(reasoning=True, tool_calls=True))
        for pieces in list(splits(text, seed=rng.randint(0, 99)))[-20:]:
            assert run_stream(pieces, OutputFormat(reasoning=True, tool_calls=True)) == expected, text
