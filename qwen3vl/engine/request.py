"""One generation request as the engine sees it: its processed prompt, sampling settings, the
tokens produced so far, incremental text with stop handling, and its final result."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..processor.tokenizer import IncrementalDetokenizer
from .output_parser import OutputFormat, OutputParser
from .sampling_params import SamplingParams
from .stopping import StopChecker
from .tool_calls import ToolCall, ToolCallDelta

_ids = itertools.count()


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int = 0
    video_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ChatResult:
    text: str           # the answer (without reasoning and tool calls when those are parsed)
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort" | "tool_calls"
    usage: Usage
    metadata: dict = field(default_factory=dict)  # e.g. sampled video frames and timestamps
    reasoning: str = ""  # a Thinking model's reasoning
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class Delta:
    """A streamed piece of a request's output; the last one carries the final result."""

    text: str
    token_ids: list[int]
    result: ChatResult | None = None
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.result is not None


class PrefillGroup:
    """Requests whose prompts are prefilled together, as one left-padded batch ``inputs``
    (input_ids (B, T), attention_mask, media tensors), into B consecutive slots: lock-step
    ``generate``. Row i of the batch is ``requests[i]``."""

    def __init__(self, inputs: dict):
        self.inputs: dict | None = inputs
        self.requests: list[Request] = []


class Request:
    """Create through ``Engine.new_request`` (or ``Engine.new_group``). ``shares_prompt``: one of several
    choices (OpenAI ``n``) of one prompt, other than the first, so usage counts that prompt once.
    ``tokenizer`` None: token ids only, no text (stop strings then never match)."""

    def __init__(self, inputs: dict, params: SamplingParams, tokenizer, image_token_id: int, video_token_id: int,
                 metadata: dict | None = None, shares_prompt: bool = False, group: PrefillGroup | None = None,
                 output: OutputFormat | None = None):
        self.id = next(_ids)
        self.inputs = inputs  # one prompt: input_ids (1, T) (its real tokens), pixel values, grids
        self.params = params
        ids = inputs["input_ids"][0]
        self.prompt_ids = ids
        self.usage = Usage(len(ids), 0, int((ids == image_token_id).sum()), int((ids == video_token_id).sum()))
        self.output_ids: list[int] = []
        self.detok = None if tokenizer is None else IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.group = group
        if group is not None:
            group.requests.append(self)
        self.stop = StopChecker(params)
        self.output_format = output
        self.parser = OutputParser(output) if output is not None and (output.reasoning or output.tool_calls) else None
        self._answer = self._reasoning = ""
        self.constraint = None  # what the output must be (engine.constrained), set by Engine.new_request
        self.matcher = None  # its grammar matcher
        self.result: ChatResult | None = None
        self.metadata = dict(metadata or {})
        self.shares_prompt = shares_prompt
        # Engine bookkeeping.
        self.slot: int | None = None
        self.cache_len = 0  # tokens in this request's KV slot
        self.next_position = 0  # MRoPE position of the next token
        self.aborted = False
        self.error: Exception | None = None
        self.state = None  # SamplingState of this request alone, until it joins the decode batch
        # Prefix caching: the prompt's media items until its prefill (None: not cached), then
        # what its blocks are keyed by (``prefix_cache.SequenceKeys``), for storing them at the end.
        self.media = None
        self.keys = None

    @property
    def live_matcher(self):
        """The grammar matcher while it applies: a Thinking model's reasoning is left free."""
        reasoning = None if self.parser is None else self.parser.reasoning
        return None if reasoning is not None and reasoning.in_reasoning else self.matcher

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def add_token(self, token: int) -> Delta:
        """Record a sampled token; returns the text it adds (stop strings withheld or cut)."""
        self.output_ids.append(token)
        res = self.stop.update(token, "" if self.detok is None else self.detok.add(token))
        text = res.text
        if res.finished and self.detok is not None:
            if res.finish_reason == "length" or token in self.stop.stop_token_ids:
                # Bytes of an unfinished character held back by the detokenizer still belong to the text.
                tail = self.detok.flush()
                text += tail
                self.stop.text += tail
        delta = self._parse(text, res.finished)
        delta.token_ids = [token]
        if res.finished:
            self._finish(res.finish_reason)
        delta.result = self.result
        return delta

    def _parse(self, text: str, final: bool) -> Delta:
        """The new text split into answer, reasoning and tool-call deltas (when the output is parsed)."""
        if self.parser is None:
            return Delta(text, [])
        parsed = self.parser.feed(text)
        if final:
            last = self.parser.finish()
            parsed.content += last.content
            parsed.reasoning += last.reasoning
            parsed.tool_calls += last.tool_calls
        self._answer += parsed.content
        self._reasoning += parsed.reasoning
        return Delta(parsed.content, [], reasoning=parsed.reasoning, tool_calls=parsed.tool_calls)

    def _finish(self, reason: str) -> None:
        self.usage.completion_tokens = len(self.output_ids)
        if self.parser is None:
            self.result = ChatResult(self.stop.text, list(self.output_ids), reason, self.usage, self.metadata)
            return
        calls = list(self.parser.calls)
        if calls and reason == "stop":
            reason = "tool_calls"
        self.result = ChatResult(self._answer, list(self.output_ids), reason, self.usage, self.metadata,
                                 self._reasoning, calls)

    def abort(self) -> Delta:
        """End the request early (client gone, engine shutting down)."""
        self.aborted = True
        delta = self._parse("", True) if self.parser is not None and self.result is None else Delta("", [])
        self._finish("abort")
        delta.result = self.result
        return delta
