"""Mapped weights moved into anonymous huge-page memory while the engine idles
(``qwen3vl.model.promote``): the same tensors (identity kept), the same values, the same logits
before, during and after; nothing outside the file mappings touched; the server's loop does it
only when it has no request."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import qwen3vl
from conftest import tiny_config
from model_inputs import Builder, batch
from qwen3vl.engine.engine import Engine
from qwen3vl.engine.sampling_params import SamplingParams
from qwen3vl.random_checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory) -> str:
    cfg = tiny_config()
    cfg["torch_dtype"] = "bfloat16"
    return write_random_checkpoint(str(tmp_path_factory.mktemp("promote")), cfg, seed=2, dtype=torch.bfloat16)


def _in(t: torch.Tensor, ranges) -> bool:
    return any(a <= t.data_ptr() < b for a, b in ranges)


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch(Builder(1).text(5).image(8, 12).text(7))).logits


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_promotion_keeps_tensors_and_results(bf16_ckpt, quantization):
    model = qwen3vl.Qwen3VL.from_pretrained(bf16_ckpt, dtype="bfloat16", quantization=quantization)
    mapped = model.mapped
    tensors = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    ranges = mapped._ranges
    assert ranges and all(_in(t, ranges) for t in tensors.values() if t.numel())
    expected = _logits(model)
    steps = 0
    while mapped.pending():
        mapped.step(max_bytes=20_000)  # small pieces: tensors complete over several steps
        steps += 1
        if steps % 7 == 0:  # a forward between pieces (some tensors moved, some not)
            assert torch.equal(_logits(model), expected)
    assert steps > 3 and mapped.moved == sum(t.numel() * t.element_size() for t in tensors.values())
    after = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    assert all(after[n] is t for n, t in tensors.items())  # swapped in place: every holder sees the copy
    assert not any(_in(t, ranges) for t in after.values() if t.numel())
    assert torch.equal(_logits(model), expected)
    ids = model.generate(**batch(Builder(1).text(6)), max_new_tokens=4, do_sample=False)
    fresh = qwen3vl.Qwen3VL.from_pretrained(bf16_ckpt, dtype="bfloat16", quantization=quantization)
    assert torch.equal(ids, fresh.generate(**batch(Builder(1).text(6)), max_new_tokens=4, do_sample=False))


def test_tensors_no_longer_mapped_are_left_alone(bf16_ckpt):
    """A weight replaced since the load (anonymous memory) is neither copied nor released: its
    values survive (releasing anonymous pages would zero them)."""
    model = qwen3vl.Qwen3VL.from_pretrained(bf16_ckpt, dtype="bfloat16")
    norm = model.model.language_model.norm.weight
    big = model.model.language_model.embed_tokens.weight
    with torch.no_grad():
        big.data = torch.full_like(big, 3.0)
        norm.data = torch.full_like(norm, 2.0)
    while model.mapped.pending():
        model.mapped.step()
    assert bool((big == 3.0).all()) and bool((norm == 2.0).all())


def test_the_server_loop_promotes_only_while_idle(bf16_ckpt):
    model = qwen3vl.Qwen3VL.from_pretrained(bf16_ckpt, dtype="bfloat16")
    reference = qwen3vl.Qwen3VL.from_pretrained(bf16_ckpt, dtype="bfloat16")
    engine = Engine(model, None, max_num_seqs=2)
    calls = []
    step = model.mapped.step
    model.mapped.step = lambda *a, **k: calls.append(engine.scheduler.has_work()) or step(*a, **k)
    threading.Thread(target=engine.run_forever, daemon=True).start()
    deadline = time.monotonic() + 60
    while model.mapped.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not model.mapped.pending() and calls and not any(calls)  # done, never with work queued
    ids = batch(Builder(1).text(6))["input_ids"][0].tolist()
    params = SamplingParams(do_sample=False, max_new_tokens=5, stop_token_ids=())
    req = engine.submit(engine.new_request({"input_ids": torch.tensor([ids])}, params))
    while req.result is None and time.monotonic() < deadline:
        time.sleep(0.01)
    expected = reference.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids):]
    assert req.result is not None and list(req.result.token_ids) == expected.tolist()


def test_a_failing_piece_stops_the_moving_with_a_warning(bf16_ckpt, monkeypatch, capfd):
    model = qwen3vl.Qwen3VL.from_pretrained(bf16_ckpt, dtype="bfloat16")
    expected = _logits(model)
    model.mapped.step(max_bytes=20_000)
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    model.mapped.idle_step()
    assert not model.mapped.pending() and "weights stay memory-mapped (out of memory)" in capfd.readouterr().err
    monkeypatch.undo()
    assert torch.equal(_logits(model), expected)


def test_huge_pages_off_keeps_weights_mapped(bf16_ckpt, monkeypatch):
    monkeypatch.setenv("QWEN3VL_HUGE_PAGES", "0")
    assert qwen3vl.Qwen3VL.from_pretrained(bf16_ckpt, dtype="bfloat16").mapped is None
    monkeypatch.delenv("QWEN3VL_HUGE_PAGES")
    assert qwen3vl.Qwen3VL.from_pretrained(bf16_ckpt, dtype="bfloat16", weight_cache=False).mapped is None
