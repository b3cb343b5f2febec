"""Chat templates: the Instruct and Thinking templates rendered by qwen3vl.processor, byte for byte as
transformers renders the same template file, and ollama's golden renderings of the Qwen3-VL templates.

Fixtures: tests/fixtures/qwen3vl-configs/{Qwen3-VL-8B-Instruct,Qwen3-VL-Thinking}/chat_template.jinja
(provenance and hashes in SOURCES.md) and tests/fixtures/chat_template_goldens.json (ollama's cases).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil

import pytest

from processor_fixtures import build_processor_dir, make_reference_processor

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CONFIGS = os.path.join(FIXTURES, "qwen3vl-configs")
INSTRUCT, THINKING = "Qwen3-VL-8B-Instruct", "Qwen3-VL-Thinking"
TEMPLATES = (INSTRUCT, THINKING)
# SHA-256 of the official files (see SOURCES.md): the template text, and chat_template.json as published
TEMPLATE_SHA256 = {INSTRUCT: "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4",
                   THINKING: "36e042fe45641f067b1f2381fcc8955d10d956a3ed333ecdf7f7eb0916f68956"}
FILE_SHA256 = {INSTRUCT: "5c72a170d2a4a1a3bc5adad2e689ae28138a9700e5b8c96c0266331e86c0acce",
               THINKING: "7dc0b863a3cf9320e063574e0adb1382a22a089f1eeb8bfbe33cc69c5c2cc1e5"}

with open(os.path.join(FIXTURES, "chat_template_goldens.json"), encoding="utf-8") as _f:
    GOLDENS = json.load(_f)["cases"]


def template_path(name: str, file: str = "chat_template.jinja") -> str:
    return os.path.join(CONFIGS, name, file)


def read_template(name: str) -> str:
    with open(template_path(name), encoding="utf-8") as f:
        return f.read()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ processors over each template
@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory) -> dict:
    """One checkpoint-like processor folder per template (the 8B-Instruct configs + tokenizer, the
    template files swapped)."""
    dirs = {}
    for name in TEMPLATES:
        path = build_processor_dir(str(tmp_path_factory.mktemp(name.lower().replace("-", "_"))))
        for file in ("chat_template.jinja", "chat_template.json"):
            shutil.copy(template_path(name, file), os.path.join(path, file))
        dirs[name] = path
    return dirs


@pytest.fixture(scope="module")
def ours(template_dirs) -> dict:
    from qwen3vl.processor import Processor

    return {name: Processor.from_pretrained(path) for name, path in template_dirs.items()}


@pytest.fixture(scope="module")
def theirs(template_dirs) -> dict:
    return {name: make_reference_processor(path) for name, path in template_dirs.items()}


def render(processor, messages, **kw) -> str:
    """The prompt string (ours or the reference: the same call), on a copy of the messages."""
    return processor.apply_chat_template(copy.deepcopy(messages), tokenize=False, **kw)


# ------------------------------------------------------------------ the fixture files themselves
@pytest.mark.parametrize("name", TEMPLATES)
def test_template_files_are_the_official_ones(name):
    with open(template_path(name, "chat_template.json"), "rb") as f:
        raw = f.read()
    assert sha256(raw) == FILE_SHA256[name]
    template = read_template(name)
    assert sha256(template.encode()) == TEMPLATE_SHA256[name]
    assert json.loads(raw)["chat_template"] == template
    # the released serialisation: 4-space indent, non-ASCII kept, no trailing newline
    assert json.dumps({"chat_template": template}, indent=4, ensure_ascii=False).encode() == raw


def test_loader_reads_the_thinking_template_from_either_file(tmp_path):
    from qwen3vl.processor.chat import load_chat_template

    template = read_template(THINKING)
    shutil.copy(template_path(THINKING, "chat_template.json"), tmp_path / "chat_template.json")
    assert load_chat_template(str(tmp_path)) == template
    shutil.copy(template_path(THINKING), tmp_path / "chat_template.jinja")
    assert load_chat_template(str(tmp_path)) == template


# ------------------------------------------------------------------ conversations
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city <b>&amp; \"quotes\" — ünïcode",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock", "description": "Current time",
                                          "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, CLOCK]


def text(t):
    return {"type": "text", "text": t}


def image(src="a.png"):
    return {"type": "image", "image": src}


def video(src="v.mp4"):
    return {"type": "video", "video": src}


def user(*parts):
    return {"role": "user", "content": parts[0] if len(parts) == 1 and isinstance(parts[0], str) else list(parts)}


def assistant(content="", **extra):
    return {"role": "assistant", "content": content, **extra}


def tool(content):
    return {"role": "tool", "content": content}


def call(name, arguments, wrapped=True):
    fn = {"name": name, "arguments": arguments}
    return {"type": "function", "function": fn} if wrapped else fn


SYSTEM = {"role": "system", "content": "You are a careful assistant."}

# name -> (messages, extra keyword arguments)
CONVERSATIONS = {
    # tools in the system block
    "tools_with_system": ([SYSTEM, user("Weather in Paris?")], {"tools": TOOLS}),
    "tools_without_system": ([user("Weather in Paris?")], {"tools": TOOLS}),
    "tools_with_system_parts": ([{"role": "system", "content": [text("Be brief. "), text("Use tools.")]},
                                 user("Time?")], {"tools": [CLOCK]}),
    "no_tools_system_parts": ([{"role": "system", "content": [text("Be brief.")]}, user("Hi")], {}),
    # assistant tool calls
    "tool_call_dict_arguments": ([user("Weather in Paris?"),
                                  assistant(tool_calls=[call("get_weather", {"city": "Paris", "unit": "celsius"})]),
                                  tool("sunny, 21°C")], {"tools": TOOLS}),
    "tool_call_string_arguments": ([user("Weather in Paris?"),
                                    assistant("Checking.", tool_calls=[call("get_weather", '{"city": "Paris"}')]),
                                    tool("sunny")], {"tools": TOOLS}),
    "tool_calls_unwrapped_and_several": ([user("Weather and time?"),
                                          assistant("Two calls.", tool_calls=[
                                              call("get_weather", {"city": "Oslo"}, wrapped=False),
                                              call("clock", {}), call("get_weather", '{"city": "Rome"}')]),
                                          tool("rain"), tool("12:00"), tool("sun"), user("Thanks!")],
                                         {"tools": TOOLS}),
    # consecutive tool messages -> one user turn of <tool_response> blocks
    "merged_tool_responses_then_user": ([SYSTEM, user("Compute"), assistant(tool_calls=[call("clock", {})]),
                                         tool("1"), tool("2"), tool("3"), user("And now?")], {}),
    "merged_tool_responses_last": ([user("Compute"), assistant("ok", tool_calls=[call("clock", {})]),
                                    tool("a"), tool("b")], {}),
    "tool_response_as_user_text": ([user("Compute"), assistant("ok", tool_calls=[call("clock", {})]),
                                    user("<tool_response>\n9\n</tool_response>")], {}),
    "system_not_first": ([user("Hi"), assistant("Hello."), {"role": "system", "content": "Switch to French."},
                          user("Bonjour?")], {}),
    # reasoning: reasoning_content / </think> in content, last turn and earlier turns
    "reasoning_last_turn": ([user("2+2?"), assistant("4", reasoning_content="\nAdd them.\n")], {}),
    "reasoning_last_turn_empty": ([user("2+2?"), assistant("4")], {}),
    "reasoning_earlier_turns": ([SYSTEM, user("2+2?"), assistant("4", reasoning_content="Add."),
                                 user("3+3?"), assistant("6", reasoning_content="Add again."), user("4+4?")], {}),
    "reasoning_in_content_last_turn": ([user("2+2?"), assistant("<think>\nAdd them.\n</think>\n\n4")], {}),
    "reasoning_in_content_without_open_tag": ([user("2+2?"), assistant("Add them.\n</think>\n\n4")], {}),
    "reasoning_in_content_earlier_turns": ([user("2+2?"), assistant("<think>Add.</think>4"), user("3+3?"),
                                            assistant("Add again.</think>\n\n6"), user("4+4?")], {}),
    "reasoning_multi_step_tools": ([user("Weather in Oslo and Rome?"),
                                    assistant("", reasoning_content="Oslo first.",
                                              tool_calls=[call("get_weather", {"city": "Oslo"})]),
                                    tool("rain"),
                                    assistant("Now Rome.</think>\n\n",
                                              tool_calls=[call("get_weather", '{"city":"Rome"}')]),
                                    tool("sun"),
                                    assistant("Oslo: rain. Rome: sun.", reasoning_content="Both known.")],
                                   {"tools": TOOLS}),
    "reasoning_not_last_without_reasoning": ([user("Go"), assistant("", tool_calls=[call("clock", {})]),
                                              tool("12:00"), assistant("It is noon.")], {}),
    # images and videos in every turn (system, user, assistant, tool)
    "media_every_turn": ([{"role": "system", "content": [text("Look closely. "), image("sys.png")]},
                          user(image(), text("What is this?")),
                          assistant([text("A cat. Compare: "), image("b.png")]),
                          user(video(), text("And this clip?"), image("c.png")),
                          assistant("", tool_calls=[call("clock", {})]),
                          tool([image("d.png"), text("frame at 12:00")]),
                          tool([video("e.mp4")]),
                          user(text("Both?"), video("f.mp4"), image("g.png"))], {}),
    "media_every_turn_vision_ids": ([user(image(), image("b.png"), text("Same?")), assistant("No."),
                                     user(video(), text("Now?"), image("c.png")),
                                     assistant("", tool_calls=[call("clock", {})]),
                                     tool([image("d.png"), video("e.mp4")]), user(video("f.mp4"), text("Last."))],
                                    {"add_vision_id": True}),
    "media_openai_image_url": ([user({"type": "image_url", "image_url": {"url": "a.png"}}, text("?"))],
                               {"add_vision_id": True}),
    "media_with_tools_and_reasoning": ([SYSTEM, user(image(), text("Weather where this photo was taken?")),
                                        assistant("", reasoning_content="Looks like Paris.",
                                                  tool_calls=[call("get_weather", {"city": "Paris"})]),
                                        tool([text("sunny"), image("map.png")]),
                                        assistant("Sunny.", reasoning_content="Answer.")],
                                       {"tools": TOOLS, "add_vision_id": True}),
    # Qwen3-VL templates have no enable_thinking switch: the variable is accepted and ignored
    "enable_thinking_false": ([user("Hi")], {"enable_thinking": False}),
}


@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["no_gen", "gen"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", TEMPLATES)
def test_renders_like_reference(ours, theirs, template, conversation, add_generation_prompt):
    messages, kw = CONVERSATIONS[conversation]
    a = render(ours[template], messages, add_generation_prompt=add_generation_prompt, **kw)
    b = render(theirs[template], messages, add_generation_prompt=add_generation_prompt, **kw)
    assert a == b


# conversations ending with an assistant message, continued
CONTINUED = {
    "plain": [user("Count to three."), assistant("One, two,")],
    "after_reasoning": [user("2+2?"), assistant("The answer is", reasoning_content="Add.")],
    "after_reasoning_in_content": [user("2+2?"), assistant("Add.</think>\n\nThe answer is")],
    "media_parts": [user(image(), text("?")), assistant([text("It shows")])],
}


def continued_params():
    params = []
    for template in TEMPLATES:
        for conversation in sorted(CONTINUED):
            params.append(pytest.param(template, conversation, id=f"{template}-{conversation}"))
    return params


@pytest.mark.parametrize("template,conversation", continued_params())
def test_continue_final_message_like_reference(ours, theirs, template, conversation):
    messages = CONTINUED[conversation]
    try:
        b = render(theirs[template], messages, continue_final_message=True)
    except ValueError as e:  # the reference refuses this conversation: so must we
        assert "final message does not appear" in str(e)
        try:
            text = render(ours[template], messages, continue_final_message=True)
        except ValueError:
            return
        raise AssertionError(f"the reference raises ValueError, qwen3vl.processor renders {text!r}")
    assert render(ours[template], messages, continue_final_message=True) == b


def test_thinking_template_behaviour(ours):
    """What issue 19 states about Thinking templates, on the verified template."""
    proc = ours[THINKING]
    prompt = render(proc, [user("Hi")], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert render(proc, [user("Hi")], add_generation_prompt=True, enable_thinking=False) == prompt
    history = render(proc, [user("a"), assistant("A1", reasoning_content="r1"), user("b"),
                                 assistant("B1</think>\n\nB2"), assistant("C", reasoning_content="r3")])
    # earlier turns keep only their content; turns after the last real query keep their reasoning
    assert "<|im_start|>assistant\nA1<|im_end|>" in history and "r1" not in history
    assert "<|im_start|>assistant\n<think>\nB1\n</think>\n\nB2<|im_end|>" in history
    assert history.endswith("<|im_start|>assistant\n<think>\nr3\n</think>\n\nC<|im_end|>\n")


# ------------------------------------------------------------------ reasoning aliases, reasoning continuation, video_url
REASONING_ALIASES = {
    # transformers (5.x) copies `reasoning` / `thinking` into `reasoning_content` before rendering
    "reasoning_key": [user("2+2?"), assistant("4", reasoning="Add them.")],
    "thinking_key": [user("2+2?"), assistant("4", thinking="Add them.")],
}


@pytest.mark.parametrize("conversation", sorted(REASONING_ALIASES))
def test_reasoning_field_aliases_like_reference(ours, theirs, conversation):
    messages = REASONING_ALIASES[conversation]
    assert render(ours[THINKING], messages) == render(theirs[THINKING], messages)


@pytest.mark.parametrize("conversation", sorted(REASONING_ALIASES))
def test_reasoning_field_aliases_ignored_by_instruct(ours, theirs, conversation):
    messages = REASONING_ALIASES[conversation]
    assert render(ours[INSTRUCT], messages) == render(theirs[INSTRUCT], messages)


def test_continue_reasoning_like_reference(ours, theirs):
    messages = [user("2+2?"), assistant("", reasoning_content="Add")]
    a = render(ours[THINKING], messages, continue_final_message="reasoning_content")
    b = render(theirs[THINKING], messages, continue_final_message="reasoning_content")
    assert b.endswith("<think>\nAdd")
    assert a == b


@pytest.mark.parametrize("template", TEMPLATES)
def test_openai_video_url_renders_as_the_qwen_form(ours, theirs, template):
    """A deliberate difference: an OpenAI-style video part ({'type': 'video_url', ...}) is read as a video
    (as the server's API takes it), so it renders as the reference renders the Qwen form of the same part
    (transformers converts only image_url parts and renders a video_url part as nothing)."""
    openai = [user({"type": "video_url", "video_url": {"url": "v.mp4"}}, text("?"))]
    qwen = [user({"type": "video", "video": "v.mp4"}, text("?"))]
    assert render(ours[template], openai) == render(theirs[template], qwen)
    assert "<|vision_start|><|video_pad|><|vision_end|>?" in render(ours[template], openai)


# ------------------------------------------------------------------ ollama's golden renderings
def golden_id(case) -> str:
    return f"{'thinking' if case['template'] == THINKING else 'instruct'}:{case['name']}"


GOLDEN_PARAMS = [pytest.param(case, id=golden_id(case)) for case in GOLDENS]


@pytest.mark.parametrize("case", GOLDEN_PARAMS)
def test_ollama_golden(ours, case):
    text = render(ours[case["template"]], case["messages"], tools=case["tools"], **case["render"])
    if "ollama_deviation" in case:  # ollama's string is not one the official template renders
        assert text != case["expected"]
    else:
        assert text == case["expected"]


@pytest.mark.parametrize("case", GOLDEN_PARAMS)
def test_ollama_golden_reference(theirs, case):
    """The goldens against the official template as transformers renders it: ollama agrees with the
    template on every case but the one marked ``ollama_deviation``."""
    text = render(theirs[case["template"]], case["messages"], tools=case["tools"], **case["render"])
    assert (text == case["expected"]) != ("ollama_deviation" in case)


def test_goldens_cover_both_templates():
    templates = {case["template"] for case in GOLDENS}
    assert templates == {INSTRUCT, THINKING}
    assert sum(case["template"] == THINKING for case in GOLDENS) == 7


# ------------------------------------------------------------------ telling a Thinking checkpoint apart
def opens_reasoning(apply_chat_template) -> bool:
    """True for a Thinking chat template: the generation prompt it adds after an (empty) user turn ends
    inside an open reasoning block, ``<think>\\n``, so the model's output holds only ``</think>``."""
    probe = [{"role": "user", "content": ""}]
    head = apply_chat_template(probe, add_generation_prompt=False)
    full = apply_chat_template(probe, add_generation_prompt=True)
    assert full.startswith(head)
    return full[len(head):].endswith("<think>\n")


def closed_thinking_template() -> str:
    """The Thinking template with a generation prompt that closes the block (a "no thinking" prefill)."""
    closed = read_template(THINKING).replace("'<|im_start|>assistant\\n<think>\\n'",
                                             "'<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'")
    assert closed != read_template(THINKING)
    return closed


def test_thinking_detection_rule(ours, theirs):
    assert opens_reasoning(lambda m, **kw: render(ours[THINKING], m, **kw))
    assert not opens_reasoning(lambda m, **kw: render(ours[INSTRUCT], m, **kw))
    assert opens_reasoning(lambda m, **kw: render(theirs[THINKING], m, **kw))
    assert not opens_reasoning(lambda m, **kw: render(theirs[INSTRUCT], m, **kw))
    closed = closed_thinking_template()
    assert not opens_reasoning(lambda m, **kw: render(ours[THINKING], m, chat_template=closed, **kw))


def test_package_thinking_detection():
    from qwen3vl.processor import chat

    opens_thinking = getattr(chat, "opens_thinking", None)
    if opens_thinking is None:
        pytest.skip("qwen3vl.processor.chat has no opens_thinking")
    assert opens_thinking(read_template(THINKING))
    assert not opens_thinking(read_template(INSTRUCT))
    assert not opens_thinking(closed_thinking_template())
    assert not opens_thinking(None)
