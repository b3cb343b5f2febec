"""The shape-stable decode step that CUDA graphs capture gives the same logits as the eager
decode path (checked on CPU, where it runs eagerly)."""
from __future__ import annotations

import torch

import qwen3vl
from model_inputs import Builder, batch
from qwen3vl.engine.cuda_graphs import StaticDecodeStep
from qwen3vl.engine.runner import Runner


def test_static_step_matches_eager_decode(tiny_ckpt):
    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt)
    prompts = [batch(Builder(1).text(4).image(8, 8).text(3)), batch(Builder(2).text(11))]
    eager, static = Runner(model, 4, 64), Runner(model, 4, 64)
    lens, nxt = [], []
    for slot, p in enumerate(prompts):
        inp = {k: v for k, v in p.items() if k != "attention_mask"}
        for r in (eager, static):
            _, pos = r.prefill(slot, inp)
        lens.append(p["input_ids"].shape[1])
        nxt.append(pos)
    step = StaticDecodeStep(model, static.cache, 4)  # a bucket larger than the batch
    tokens = torch.tensor([17, 23])
    for i in range(3):
        cache_pos = torch.tensor(lens) + i
        positions = torch.tensor(nxt) + i
        want = eager.decode(tokens, positions, cache_pos, int(cache_pos.max()) + 1)
        step.load(tokens, positions, cache_pos)
        got = step.run()[:2]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tokens = want.argmax(-1)
