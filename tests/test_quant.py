"""Weight-only int8 / int4 formats: kernels agree with their dequantized weights, logits stay
close to fp32 on the tiny checkpoint, tied embeddings are handled, generation runs."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import qwen3vl
from model_inputs import Builder, batch
from qwen3vl.quant import QuantLinear

# Issue 7's bounds are 2e-2 (int8) and 8e-2 (int4) of the max logit, held on the quality
# benchmark's prompt (test_quality_bounds_on_the_benchmark_prompt); this padded mixed batch
# measures int8 ~2.2e-2 (bf16 activations alone are ~1.1e-2 here), int4 ~3.6e-2.
BOUNDS = {"int8": 3e-2, "int4": 8e-2}


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("mode,group", [("int8", 64), ("int4", 32), ("int4", 128)])
def test_packed_kernels_match_dequantized_weight(mode, group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.02
    lin = QuantLinear(512, 256, mode, group)
    lin.load_weight((0, 100), w[:100])  # rows arrive in slices (fused q/k/v)
    lin.load_weight((100, 256), w[100:])
    lin.finalize()
    deq = lin.dequantized().float()
    assert rel(deq, w) < (0.01 if mode == "int8" else 0.1)
    for m in (1, 3, 40):  # decode kernel rows and the prefill (dequantize + GEMM) path
        x = torch.randn(m, 512, generator=g)
        y = lin(x)
        assert y.shape == (m, 256) and y.dtype == x.dtype
        assert rel(y, x.bfloat16().float() @ deq.t()) < 2e-2


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_tied_sharded_ckpt"])
def test_quantized_logits_close_to_fp32(request, fixture, mode):
    path = request.getfixturevalue(fixture)
    inputs = batch(Builder(1).text(5).image(8, 12).text(7), Builder(2).text(9))
    ref = qwen3vl.Qwen3VL.from_pretrained(path)(**inputs).logits
    model = qwen3vl.Qwen3VL.from_pretrained(path, dtype="bfloat16", quantization=mode)
    layer = model.model.language_model.layers[0]
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.mode == "int8"
    assert layer.mlp.gate_up_proj.mode == layer.mlp.down_proj.mode == mode  # the format's layers
    assert layer.self_attn.qkv_proj.mode == layer.self_attn.o_proj.mode == "int8"  # see qwen3vl.quant
    out = model(**inputs).logits.float()
    valid = inputs["attention_mask"].bool()
    assert rel(out[valid], ref[valid]) <= BOUNDS[mode]
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert ids.shape == (2, inputs["input_ids"].shape[1] + 6)


@pytest.mark.parametrize("mode,bound", [("int8", 2e-2), ("int4", 8e-2)])
def test_quality_bounds_on_the_benchmark_prompt(tiny_ckpt, mode, bound):
    """The quality guard as issue 7 states it, on the prompt bench/bench_quality.py reports
    (text + image, the same tiny checkpoint, bf16 activations): logits within ``bound`` of the
    fp32 model's max |logit|."""
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_quality.py")
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    bench_quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_quality)
    inputs = bench_quality.prompt()
    with torch.inference_mode():
        ref = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt)(**inputs).logits[0]
        model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype="bfloat16", quantization=mode)
        out = model(**inputs).logits[0].float()
    assert rel(out, ref) <= bound


def test_unknown_quantization_is_a_clear_error(tiny_ckpt):
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, quantization="int3")
    with pytest.raises(ValueError, match="group size"):
        qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, quantization="int4", group_size=48)
