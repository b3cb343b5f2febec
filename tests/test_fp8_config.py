"""FP8 checkpoints, continued: config and checkpoint errors, ``modules_to_not_convert`` matching
(the reference's rules), the release config fixtures, and the CUDA FP8 layer (``quantization="fp8"``)
as far as it runs on a CPU: its FP8 weights and scales are kept exactly as stored and its
dequantizing fallback gives the dequantized model's logits. The blockwise ``F.scaled_mm`` path
itself needs a Hopper GPU: not exercised here (unverified)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import qwen3vl
from model_inputs import Builder, batch
from qwen3vl.config import ConfigError, Qwen3VLConfig
from qwen3vl.fp8 import Fp8Error, excluded
from qwen3vl.quant import Fp8Linear, fp8_modules, quantize_activations
from qwen3vl.random_checkpoint import random_tensors
from qwen3vl.weights import load_checkpoint
from test_fp8 import ALIGNED, EDGE, FIXTURE, aligned, edge, load, qconfig, to_fp8, write  # noqa: F401


def test_release_configs_parse_and_give_per_expert_names():
    """The FP8 config fixtures (tests/fixtures/fp8/SOURCES.md) parse; the 30B-A3B per-expert names
    cover every expert with (N, K) shapes whose scale grids use ceil."""
    from qwen3vl.fp8 import scale_shape
    from qwen3vl.weights import _Destinations, _target_shape, name_table

    fixtures = os.path.dirname(FIXTURE)
    cfg = Qwen3VLConfig.from_pretrained(os.path.join(fixtures, "Qwen3-VL-8B-Instruct-FP8.config.json"))
    assert cfg.quantization.weight_block_size == (128, 128) and "lm_head" in cfg.quantization.modules_to_not_convert
    moe_cfg = os.path.join(fixtures, "Qwen3-VL-30B-A3B-Instruct-FP8.config.json")
    meta = qwen3vl.Qwen3VL.from_config(moe_cfg, device="meta")
    table, dest = name_table(meta.config, per_expert=True), _Destinations(meta)
    experts = [n for n in table if ".mlp.experts." in n]
    assert len(experts) == 48 * 128 * 3 and not any(n.endswith("gate_up_proj") for n in table)
    shape = lambda n: _target_shape(table[n], dest.shape(table[n].param))  # noqa: E731
    assert shape("model.language_model.layers.7.mlp.experts.127.up_proj.weight") == (768, 2048)
    assert shape("model.language_model.layers.7.mlp.experts.0.down_proj.weight") == (2048, 768)
    assert scale_shape((4096, 12288), (128, 128)) == (32, 96) and scale_shape((192, 320), (128, 128)) == (2, 3)


@pytest.mark.parametrize("over,words", [
    ({"quant_method": "awq"}, ["'awq'", "fp8"]),
    ({"fmt": "e5m2"}, ["'e5m2'", "e4m3"]),
    ({"weight_block_size": [64, 64]}, ["[64, 64]", "[128, 128]"]),
    ({"weight_block_size": None}, ["None", "per-tensor"]),
    ({"activation_scheme": "static"}, ["'static'", "dynamic"]),
    ({"modules_to_not_convert": "lm_head"}, ["modules_to_not_convert", "'lm_head'"]),
])
def test_unsupported_quantization_configs_are_refused(over, words):
    cfg = copy.deepcopy(EDGE)
    cfg["quantization_config"] = qconfig(**over)
    with pytest.raises(ConfigError) as e:
        Qwen3VLConfig.from_dict(cfg)
    assert all(w in str(e.value) for w in words), str(e.value)


def broken(tmp_path, edit) -> str:
    cfg = copy.deepcopy(EDGE)
    q8, _ = to_fp8(random_tensors(EDGE, seed=9), EDGE, torch.float32)
    edit(cfg, q8)
    return write(str(tmp_path / "broken"), cfg, q8)


K = "model.language_model.layers.1.self_attn.k_proj.weight"


@pytest.mark.parametrize("edit,words", [
    (lambda c, t: t.pop(K + "_scale_inv"), [K, "without", "weight_scale_inv"]),
    (lambda c, t: t.update({K + "_scale_inv": torch.ones(2, 2)}), [K + "_scale_inv", "[2, 2]", "[1, 2]"]),
    (lambda c, t: t.update({K + "_scale_inv": t[K + "_scale_inv"].half()}), ["torch.float16", "scale dtypes"]),
    (lambda c, t: t.update({K: t[K].to(torch.float8_e5m2)}), ["float8_e5m2", "float8_e4m3fn"]),
    (lambda c, t: c["quantization_config"]["modules_to_not_convert"].append("mlp.down_proj"),
     ["mlp.down_proj.weight_scale_inv", "modules_to_not_convert", "excludes"]),
])
def test_inconsistent_fp8_checkpoints_are_refused(tmp_path, edit, words):
    with pytest.raises(Fp8Error) as e:
        load(broken(tmp_path, edit))
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("module", [
    "lm_head", "model.visual.blocks.0.attn.qkv", "model.language_model.layers.3.mlp.gate",
    "model.language_model.layers.3.mlp.gate_proj", "model.language_model.layers.11.self_attn.q_proj",
    "model.language_model.layers.1.self_attn.o_proj", "model.visualx.proj"])
def test_modules_to_not_convert_matching_follows_the_reference(module):
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = ["lm_head", "model.visual", "mlp.gate", "model.language_model.layers.1", r"layers\.1\d\.self_attn"]
    assert excluded(module, patterns) == (not should_convert_module(module, patterns))


# ------------------------------------------------------------------ quantization="fp8" (CUDA layer)
def fp8_model(path: str):
    """The model as ``from_pretrained(quantization="fp8")`` builds it, but on the CPU."""
    model = qwen3vl.Qwen3VL.from_config(path, device="meta", dtype=torch.float32)
    fp8_modules(model)
    model.materialize("cpu")
    load_checkpoint(model, path)
    return model.eval()


def test_fp8_layer_keeps_weights_and_scales_as_stored(aligned):
    fp8_path, deq_path, q8 = aligned
    model = fp8_model(fp8_path)
    attn = model.model.language_model.layers[1].self_attn.qkv_proj
    assert isinstance(attn, Fp8Linear) and not isinstance(model.lm_head, Fp8Linear)  # lm_head: not converted
    p = "model.language_model.layers.1.self_attn."
    stored = torch.cat([q8[p + n + ".weight"] for n in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(attn.weight.view(torch.uint8), stored.view(torch.uint8))
    assert torch.equal(attn.weight_scale_inv, torch.cat([q8[p + n + ".weight_scale_inv"].float()
                                                         for n in ("q_proj", "k_proj", "v_proj")]))
    # On a CPU the layer dequantizes per call: the dequantized model's logits.
    inputs = batch(Builder(21).text(5).image(8, 12).text(7))
    torch.testing.assert_close(model(**inputs).logits, load(deq_path)(**inputs).logits, rtol=1e-5, atol=1e-6)


def test_fp8_layer_refuses_fused_rows_off_the_tiles(edge):
    with pytest.raises(ValueError, match="not on 128-row tiles"):  # q 192 rows, then k at row 192
        fp8_model(edge[0])


def test_dynamic_activation_quantization_uses_per_token_128_column_scales():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=g) * torch.linspace(0.1, 10, 256)
    q, s = quantize_activations(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 2)
    assert torch.equal(s, x.view(5, 2, 128).abs().amax(-1) / 448)
    back = q.float().view(5, 2, 128) * s[..., None]
    assert float(((back.view(5, 256) - x).abs() / x.abs().amax()).max()) < 0.07  # e4m3: 3 mantissa bits


def test_fp8_mode_is_cuda_only_and_needs_an_fp8_checkpoint(aligned, tmp_path):
    with pytest.raises(ValueError, match="CUDA block-scaled matmuls; on cpu"):
        qwen3vl.Qwen3VL.from_pretrained(aligned[0], quantization="fp8", device="cpu")
    with pytest.raises(ValueError, match="needs an FP8 checkpoint"):
        fp8_modules(qwen3vl.Qwen3VL.from_config(aligned[1], device="meta"))
