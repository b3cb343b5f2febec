"""``qwen3vl.LLM``: the high-level API — load once, then chat (batched) or stream.

    llm = qwen3vl.LLM("path/to/Qwen3-VL-2B-Instruct")
    res = llm.chat([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                                 {"type": "text", "text": "What is this?"}]}])
    print(res.text, res.finish_reason, res.usage)
    for delta in llm.stream_chat(messages): print(delta.text, end="")

Sampling settings default to the checkpoint's generation_config.json over the variant's
recommended ones (Instruct / Thinking); ``max_tokens`` is accepted as an alias of
``max_new_tokens``. A Thinking checkpoint's results carry ``.reasoning`` apart from ``.text``;
with ``tools=[...]``, tool calls the model makes come back parsed in ``.tool_calls``. Several conversations in one ``chat`` call run as one
continuous batch. ``tensor_parallel_size=N`` shards the text decoder over N ranks
(``qwen3vl.parallel``; ``enable_expert_parallel`` for MoE experts; ``shutdown()`` stops them).
"""
from __future__ import annotations

from collections.abc import Iterator

from ..demo import demo_checkpoint, is_demo
from ..model.qwen3vl import resolve_model_path
from ..parallel import RankArgs, TensorParallel, threads_per_rank, timeout_s
from ..processor import MediaLimits, Processor
from ..processor.chat import opens_thinking
from ..processor.options import MEDIA_OPTIONS
from .engine import Engine
from .generate import MODEL_INPUTS
from .hf import Qwen3VL
from .constrained import request_constraint
from .output_parser import OutputFormat
from .request import ChatResult, Delta, Request
from .sampling_params import SamplingParams, variant_defaults

# Keyword arguments of chat / stream_chat that reach the chat template.
TEMPLATE_OPTIONS = ("add_vision_id", "tools", "enable_thinking")
# Keyword arguments of chat / stream_chat that constrain the output (OpenAI's names).
CONSTRAINT_OPTIONS = ("tool_choice", "response_format", "parallel_tool_calls")


class LLM:
    def __init__(self, model: str | None = None, dtype="auto", device="cpu", max_num_seqs: int = 8,
                 max_model_len: int | None = None, progress: bool | None = None, quantization: str | None = None,
                 group_size: int = 64, media_limits: MediaLimits | None = None, prefix_cache_gb: float = 2.0,
                 enable_prefix_caching: bool = True, max_num_batched_tokens: int = 512,
                 rope_scaling: dict | str | None = None, tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, on_rank_failure=None):
        path = demo_checkpoint() if model is None else resolve_model_path(model)
        self.path = path
        self.is_demo = is_demo(path)
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.parallel = None  # tensor_parallel_size > 1: the rank group (qwen3vl.parallel)
        if tensor_parallel_size > 1:
            self.parallel = _start_parallel(path, tensor_parallel_size, enable_expert_parallel, device, dtype,
                                            quantization, group_size, rope_scaling, on_rank_failure)
            self.model = self.parallel.model
            enable_prefix_caching = False  # the prefix cache copies KV blocks of one rank's cache only
        else:
            self.model = Qwen3VL.from_pretrained(path, dtype=dtype, device=device, progress=progress,
                                                 quantization=quantization, group_size=group_size,
                                                 rope_scaling=rope_scaling)  # YaRN over config.json's
        self.processor = Processor.from_pretrained(path, limits=media_limits)
        self.engine = Engine(self.model, self.processor, max_num_seqs, max_model_len,
                             prefix_cache_gb=prefix_cache_gb, enable_prefix_caching=enable_prefix_caching,
                             max_num_batched_tokens=max_num_batched_tokens,
                             runner=None if self.parallel is None else self.parallel.runner)
        # A Thinking checkpoint: outputs start inside the reasoning; its own sampling defaults apply.
        self.thinking = opens_thinking(self.processor.chat_template)

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks (also done at interpreter exit); no-op in one process."""
        if self.parallel is not None:
            self.parallel.shutdown()

    # ------------------------------------------------------------------ inputs
    def sampling_params(self, sampling_params: SamplingParams | None = None, **kw) -> SamplingParams:
        if sampling_params is not None:
            return sampling_params
        if "max_tokens" in kw:
            kw["max_new_tokens"] = kw.pop("max_tokens")
        return SamplingParams.from_generation_config(variant_defaults(self.thinking, self.model.generation_config),
                                                     **kw)

    def request(self, messages: list[dict], params: SamplingParams, mm_processor_kwargs: dict | None = None,
                tool_choice=None, response_format: dict | None = None, parallel_tool_calls: bool = True,
                **template_kwargs) -> Request:
        """Process one conversation into an engine request (raises on bad input). ``tools`` (a
        template keyword) are offered to the model and its calls parsed; ``tool_choice`` "none"
        leaves them out; "required" / a named function and ``response_format`` constrain the output."""
        if tool_choice == "none":
            template_kwargs.pop("tools", None)
        constraint = request_constraint(template_kwargs.get("tools"), tool_choice, response_format,
                                        parallel_tool_calls, self.thinking)
        options = dict(mm_processor_kwargs or {})
        unknown = set(options) - set(MEDIA_OPTIONS)
        if unknown:
            raise ValueError(f"unknown media option(s) {sorted(unknown)}; allowed: {list(MEDIA_OPTIONS)}")
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt",
                                                    return_metadata=True, **template_kwargs, **options)
        # The model takes tensors; sampled-frame metadata stays with the request (ChatResult.metadata).
        model_inputs = {k: inputs[k] for k in MODEL_INPUTS if k in inputs and k != "attention_mask"}
        metadata = {k: v for k, v in inputs.items() if k not in MODEL_INPUTS and k != "mm_token_type_ids"}
        output = OutputFormat(reasoning=self.thinking, tool_calls=bool(template_kwargs.get("tools")))
        return self.engine.new_request(model_inputs, params, metadata, output=output, constraint=constraint)

    def prompt_request(self, prompt: str, params: SamplingParams) -> Request:
        """Raw prompt text (no chat template; no media) into an engine request."""
        ids = self.processor(text=prompt, return_tensors="pt")["input_ids"]
        return self.engine.new_request({"input_ids": ids}, params)

    def _split(self, messages, sampling_params, kw):
        batched = bool(messages) and isinstance(messages[0], list)
        convs = messages if batched else [messages]
        mm = kw.pop("mm_processor_kwargs", None)
        template = {k: kw.pop(k) for k in TEMPLATE_OPTIONS + CONSTRAINT_OPTIONS if k in kw}
        params = self.sampling_params(sampling_params, **kw)
        return batched, [self.request(c, params, mm, **template) for c in convs]

    # ------------------------------------------------------------------ API
    def chat(self, messages, sampling_params: SamplingParams | None = None, **kw) -> ChatResult | list[ChatResult]:
        """One conversation -> ChatResult; a list of conversations -> list of ChatResult."""
        batched, reqs = self._split(messages, sampling_params, kw)
        for r in reqs:
            self.engine.submit(r)
        self.engine.run_until_done(reqs)
        for r in reqs:
            if r.error is not None:
                raise r.error
        results = [r.result for r in reqs]
        return results if batched else results[0]

    def stream_chat(self, messages, sampling_params: SamplingParams | None = None, **kw) -> Iterator[Delta]:
        """Yield ``Delta``s (``.text`` pieces, UTF-8 safe); the last has ``.result`` (a ChatResult)."""
        batched, reqs = self._split(messages, sampling_params, kw)
        if batched:
            raise ValueError("stream_chat takes one conversation")
        req = reqs[0]
        self.engine.submit(req)
        try:
            while req.result is None:
                for r, delta in self.engine.step():
                    if r is req:
                        if r.error is not None:
                            raise r.error
                        yield delta
        finally:
            if req.result is None:  # the consumer stopped early
                self.engine.cancel(req)
                while req.result is None:
                    self.engine.step()


class ShardedModelError(RuntimeError):
    """A direct call on rank 0's shard of a tensor-parallel model: its forward passes need every
    rank, and only the engine's runner drives them all."""


class _ShardedQwen3VL(Qwen3VL):
    """Rank 0's shard: ``generate`` and ``forward`` are refused (``ShardedModelError``); use
    ``LLM.chat`` / ``LLM.stream_chat``, which go through the engine."""

    def generate(self, *args, **kwargs):
        raise ShardedModelError("generate() on a tensor-parallel model: use LLM.chat / LLM.stream_chat")

    def forward(self, *args, **kwargs):
        raise ShardedModelError("model(**batch) on a tensor-parallel model: use LLM.chat / LLM.stream_chat")


def _start_parallel(path, size, expert_parallel, device, dtype, quantization, group_size, rope_scaling, on_failure):
    """The tensor-parallel group of ``LLM(tensor_parallel_size=size)``: rank 0 here, the others
    spawned on this host (or joined under torchrun)."""
    if str(device) != "cpu":
        raise ValueError(f"tensor_parallel_size > 1 runs on the CPU (gloo) only; got device={device!r}")
    dtype = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    args = RankArgs(path, dtype, quantization, group_size, rope_scaling, expert_parallel, threads_per_rank(size),
                    timeout_s())
    return TensorParallel(size, args, _ShardedQwen3VL, on_failure)
