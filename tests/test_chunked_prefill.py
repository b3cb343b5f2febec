"""Chunked prefill: while a long prompt (image and video) is prefilled piece by piece, running
requests keep decoding a token per step, and every request's greedy tokens and fp32 first-token
logits equal those of running it alone in one piece (demo checkpoint: tiny fp32 random weights,
the real tokenizer)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import qwen3vl
from conftest import fresh_home, home_env
from processor_fixtures import write_video
from qwen3vl.engine.engine import Engine
from qwen3vl.engine.prefill import ALONE_CHUNK, chunk_size

REL = 1e-5
BUDGET = 32
MODEL_INPUTS = ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    with home_env(fresh_home(tmp_path_factory)):
        yield qwen3vl.LLM(max_num_seqs=4)


@pytest.fixture(scope="module")
def prompts(llm, tmp_path_factory):
    """name -> processed prompt: short texts and a long image + video one."""
    clip = write_video(str(tmp_path_factory.mktemp("clip") / "clip.mp4"), 32, fps=4, width=128, height=128)
    pixels = np.random.default_rng(0).integers(0, 256, (256, 320, 3), dtype=np.uint8)

    def encode(*content):
        parts = [{"type": "text", "text": c} if isinstance(c, str) else c for c in content]
        out = llm.processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True, return_tensors="pt", fps=2)
        return {k: v for k, v in out.items() if k in MODEL_INPUTS}

    long = encode({"type": "image", "image": Image.fromarray(pixels)}, {"type": "video", "video": clip},
                  "Describe the picture and the clip in as much detail as you can.")
    assert long["input_ids"].shape[1] > 4 * BUDGET
    return {"a": encode("Count from one to one hundred."), "b": encode("Tell me a story."), "long": long}


def params(llm, tokens: int):
    return llm.sampling_params(max_tokens=tokens, min_new_tokens=tokens, temperature=0, presence_penalty=0)


def play(engine: Engine, llm, plan: list[tuple[int, dict, int]]) -> tuple[list, dict, list]:
    """Submit each (step, prompt, tokens) at its step, step until all are done -> (requests,
    first-token logits by request id, per step the ids of the requests that got a token)."""
    first: dict[int, torch.Tensor] = {}

    def capture(requests, logits, processed):
        for i, r in enumerate(requests):
            first.setdefault(r.id, logits[i].clone())

    engine.on_logits = capture
    reqs = [engine.new_request(inputs, params(llm, tokens)) for _, inputs, tokens in plan]
    timeline, step = [], 0
    while any(r.result is None for r in reqs):
        for (at, _, _), r in zip(plan, reqs):
            if at == step:
                engine.submit(r)
        timeline.append([r.id for r, d in engine.step() if d.token_ids])
        step += 1
    assert [r.error for r in reqs] == [None] * len(reqs)
    return reqs, first, timeline


def alone(llm, inputs: dict, tokens: int, **kw):
    """A prompt run by itself on a fresh engine: prefilled in one piece."""
    engine = Engine(llm.model, llm.processor, 4, **kw)
    (req,), first, _ = play(engine, llm, [(0, inputs, tokens)])
    return req.result.token_ids, first[req.id]


def assert_same(req, first, want) -> None:
    tokens, logits = want
    assert req.result.token_ids == tokens
    got = first[req.id]
    assert float((got - logits).abs().max()) <= REL * float(logits.abs().max())


@pytest.mark.parametrize("caching", [True, False])
def test_long_prompt_is_chunked_while_another_stream_decodes(llm, prompts, caching):
    engine = Engine(llm.model, llm.processor, 4, max_num_batched_tokens=BUDGET, enable_prefix_caching=caching)
    (a, long), first, timeline = play(engine, llm, [(0, prompts["a"], 30), (2, prompts["long"], 4)])
    for req, name, tokens in ((a, "a", 30), (long, "long", 4)):
        assert_same(req, first, alone(llm, prompts[name], tokens, enable_prefix_caching=caching))
    # Admitted at step 2, the long prompt's media are encoded in pieces of at most budget - 1
    # tokens (whole frames; the image is one piece), then its first token comes after
    # ceil(T / (budget - 1)) chunks; the running stream got a token at every one of those steps.
    n = prompts["long"]["input_ids"].shape[1]
    t, h, w = prompts["long"]["video_grid_thw"][0].tolist()
    per_piece = max(1, (BUDGET - 1) // (h * w // 4))
    pieces = 1 + -(-t // per_piece)
    chunks = -(-n // (BUDGET - 1))
    assert t > 1 and pieces > 2
    first_long = next(i for i, ids in enumerate(timeline) if long.id in ids)
    assert first_long == 2 + pieces + chunks - 1
    assert all(a.id in timeline[i] for i in range(2, first_long + 1))


def test_prompt_prefilled_below_a_decoding_slot(llm, prompts):
    """Slot 0 frees while slot 1 decodes: the long prompt is prefilled in slot 0, under the
    decode batch's dummy row for it, which must not disturb its cache."""
    engine = Engine(llm.model, llm.processor, 4, max_num_batched_tokens=BUDGET)
    plan = [(0, prompts["a"], 3), (0, prompts["b"], 40), (5, prompts["long"], 4)]
    reqs, first, _ = play(engine, llm, plan)
    assert reqs[2].slot is None and reqs[2].result.usage.prompt_tokens == prompts["long"]["input_ids"].shape[1]
    for req, (_, inputs, tokens) in zip(reqs, plan):
        assert_same(req, first, alone(llm, inputs, tokens))


def test_cancel_during_chunked_prefill(llm, prompts):
    engine = Engine(llm.model, llm.processor, 4, max_num_batched_tokens=BUDGET)
    a = engine.submit(engine.new_request(prompts["a"], params(llm, 12)))
    long = engine.submit(engine.new_request(prompts["long"], params(llm, 4)))
    for _ in range(3):
        engine.step()
    assert engine._filling is not None and engine._filling.req is long
    engine.cancel(long)
    engine.run_until_done([a, long])
    assert long.result.finish_reason == "abort" and long.result.token_ids == []
    assert a.result.token_ids == alone(llm, prompts["a"], 12)[0]
    (again,), first, _ = play(engine, llm, [(0, prompts["long"], 4)])  # the slot and cache are usable
    assert_same(again, first, alone(llm, prompts["long"], 4))


def test_chunk_size():
    assert chunk_size(512, 0, 5000) == 5000  # nobody waits: one piece
    assert chunk_size(512, 0, 40000) == ALONE_CHUNK  # but bounded activations
    assert chunk_size(20000, 0, 40000) == 20000
    assert chunk_size(512, 3, 5000) == 509
    assert chunk_size(512, 3, 100) == 100
    assert chunk_size(16, 40, 5000) == 16  # always progresses
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 16"):
        Engine.__init__(object.__new__(Engine), None, None, max_num_batched_tokens=8)
