"""Real configs build on the meta device with the reference's parameter counts and the released
tensor names/shapes; config dialects; bad checkpoints fail with clear errors."""
from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

import qwen3vl
from conftest import fused_param
from qwen3vl.config import ConfigError, Qwen3VLConfig
from qwen3vl.random_checkpoint import TINY_CONFIG, random_tensors, write_checkpoint
from qwen3vl.weights import WeightsError, checkpoint_shapes, name_table

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "qwen3vl-configs")
DENSE = ["Qwen3-VL-2B-Instruct", "Qwen3-VL-4B-Instruct", "Qwen3-VL-8B-Instruct", "Qwen3-VL-32B-Instruct"]
MOE = ["Qwen3-VL-30B-A3B-Instruct", "Qwen3-VL-235B-A22B-Instruct"]


def fixture_dir(name: str) -> str:
    path = os.path.join(FIXTURES, name)
    if not os.path.isdir(path):
        pytest.fail(f"config fixtures not found at {path}")
    return path


def reference_param_count(path: str) -> int:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.from_pretrained(path)
    cls = (transformers.Qwen3VLMoeForConditionalGeneration if cfg.model_type == "qwen3_vl_moe"
           else transformers.Qwen3VLForConditionalGeneration)
    with torch.device("meta"):
        ref = cls(cfg)
    return sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("name", DENSE + MOE)
def test_real_config_builds_on_meta_with_reference_shapes(name):
    path = fixture_dir(name)
    model = qwen3vl.Qwen3VL.from_config(path, device="meta")
    assert all(p.is_meta for p in model.parameters())
    with open(os.path.join(path, "weight_shapes.derived.json")) as f:
        expected = {k: tuple(v) for k, v in json.load(f).items()}
    assert checkpoint_shapes(model) == expected
    ours = sum(p.numel() for p in model.parameters())
    assert ours == sum(torch.Size(s).numel() for s in expected.values())
    assert ours == reference_param_count(path)


def test_both_config_dialects_parse_the_same():
    with open(os.path.join(fixture_dir("Qwen3-VL-2B-Instruct"), "config.json"), encoding="utf-8") as f:
        released = json.load(f)
    v5 = copy.deepcopy(released)  # the transformers >= 5 re-serialisation of the same file
    tc = v5["text_config"]
    tc["rope_parameters"] = dict(tc.pop("rope_scaling"), rope_theta=tc.pop("rope_theta"))
    v5["vision_config"]["model_type"] = "qwen3_vl_vision"
    v5["vision_config"]["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "axial"}
    a, b = Qwen3VLConfig.from_dict(released), Qwen3VLConfig.from_dict(v5)
    assert a == b
    assert a.text.rope_theta == 5_000_000 and a.text.mrope_section == (24, 20, 20)
    assert a.tie_word_embeddings and a.vision.deepstack_visual_indexes == (5, 11, 17)


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c.update(model_type="llava"), "unknown model_type 'llava'"),
    (lambda c: c["text_config"].pop("hidden_size"), "text_config.hidden_size"),
    (lambda c: c["vision_config"].pop("depth"), "vision_config.depth"),
    (lambda c: c["text_config"].pop("rope_theta"), "text_config.rope_theta"),
    (lambda c: c.pop("vision_config"), "vision_config"),
])
def test_bad_config_names_the_field(mutate, needle):
    cfg = copy.deepcopy(TINY_CONFIG)
    mutate(cfg)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        Qwen3VLConfig.from_dict(cfg)


@pytest.fixture(scope="module")
def tiny_tensors():
    return random_tensors(TINY_CONFIG, seed=3)


def _write(tmp_path, tensors, config=TINY_CONFIG):
    return write_checkpoint(str(tmp_path), config, tensors)


def test_missing_tensor_is_listed(tmp_path, tiny_tensors):
    t = dict(tiny_tensors)
    del t["model.language_model.layers.2.self_attn.k_proj.weight"]
    with pytest.raises(WeightsError, match=r"(?s)1 missing tensor.*layers\.2\.self_attn\.k_proj\.weight"):
        qwen3vl.Qwen3VL.from_pretrained(_write(tmp_path, t))


def test_unexpected_tensor_is_listed(tmp_path, tiny_tensors):
    t = dict(tiny_tensors, **{"model.visual.extra.weight": torch.zeros(3)})
    with pytest.raises(WeightsError, match=r"(?s)1 unexpected tensor.*model\.visual\.extra\.weight"):
        qwen3vl.Qwen3VL.from_pretrained(_write(tmp_path, t))


def test_wrong_shape_is_listed(tmp_path, tiny_tensors):
    t = dict(tiny_tensors)
    t["model.visual.blocks.1.mlp.linear_fc1.weight"] = torch.zeros(65, 32)
    with pytest.raises(WeightsError, match=r"(?s)wrong shape.*blocks\.1\.mlp\.linear_fc1\.weight: \[65, 32\] \(expected \[64, 32\]\)"):
        qwen3vl.Qwen3VL.from_pretrained(_write(tmp_path, t))


def test_truncated_safetensors(tmp_path, tiny_tensors):
    path = _write(tmp_path, tiny_tensors)
    fn = os.path.join(path, "model.safetensors")
    size = os.path.getsize(fn)
    with open(fn, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(WeightsError, match=r"cannot read .*model\.safetensors.*truncated"):
        qwen3vl.Qwen3VL.from_pretrained(path)


@pytest.mark.parametrize("damage, why", [
    (lambda b: b[:4], "file shorter than the 8-byte header"),
    (lambda b: (2**40).to_bytes(8, "little") + b[8:], "header length .* exceeds the file size"),
    (lambda b: b[:8] + b"{" * 8 + b[16:], "header is not JSON"),
])
def test_corrupt_safetensors_header(tmp_path, tiny_tensors, damage, why):
    path = _write(tmp_path, tiny_tensors)
    fn = os.path.join(path, "model.safetensors")
    with open(fn, "rb") as f:
        data = f.read()
    with open(fn, "wb") as f:
        f.write(damage(data))
    with pytest.raises(WeightsError, match=f"cannot read .*model\\.safetensors: {why}"):
        qwen3vl.Qwen3VL.from_pretrained(path)


def test_loaded_weights_equal_file_tensors(tmp_path, tiny_tensors):
    """Every parameter read by our safetensors reader equals the safetensors library's tensor
    (direct reads into parameters, dtype conversion, and fused-row slices)."""
    from safetensors.torch import load_file

    path = _write(tmp_path, tiny_tensors)
    ref = load_file(os.path.join(path, "model.safetensors"))
    for dtype in (torch.float32, torch.bfloat16):
        model = qwen3vl.Qwen3VL.from_pretrained(path, dtype=dtype)
        for name, tgt in name_table(model.config).items():
            p = fused_param(model, tgt.param)
            if tgt.rows is not None:
                p = p[tgt.rows[0] : tgt.rows[1]]
            assert torch.equal(p, ref[name].to(dtype)), name


def test_unknown_model_type_in_checkpoint(tmp_path, tiny_tensors):
    path = _write(tmp_path, tiny_tensors)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["model_type"] = "qwen2_vl"
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match="unknown model_type 'qwen2_vl'"):
        qwen3vl.Qwen3VL.from_pretrained(path)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        qwen3vl.Qwen3VL.from_pretrained(str(tmp_path / "nope" / "deeper"))
    shutil.copy(os.path.join(fixture_dir("Qwen3-VL-2B-Instruct"), "config.json"), tmp_path / "config.json")
    with pytest.raises(WeightsError, match="no \\*.safetensors files"):
        qwen3vl.Qwen3VL.from_pretrained(str(tmp_path))


def test_placeholder_count_mismatch_gives_both_counts(tiny_ckpt):
    from model_inputs import Builder, batch

    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt)
    inputs = batch(Builder(0).text(3).image(8, 8).text(2))
    inputs["input_ids"][0, 5] = 11  # drop one image placeholder
    with pytest.raises(ValueError, match=r"15 placeholder tokens.*16 features"):
        model(**inputs)


def test_meta_build_has_no_uninitialised_rotary_tables():
    model = qwen3vl.Qwen3VL.from_config(TINY_CONFIG, device="meta")
    cos, sin = model.rope(torch.zeros(3, 1, 4, dtype=torch.long), torch.float32)
    assert torch.equal(cos, torch.ones_like(cos)) and torch.equal(sin, torch.zeros_like(sin))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_loaded_under_inference_mode_runs(tiny_ckpt, dtype):
    """Weights created inside torch.inference_mode (no version counters) work, in and out of it."""
    from model_inputs import Builder, batch

    inputs = batch(Builder(3).text(6))
    expected = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype=dtype)(**inputs).logits
    with torch.inference_mode():
        model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype=dtype)
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
        ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 9)
