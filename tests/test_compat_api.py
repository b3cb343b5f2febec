"""Drop-in names for transformers code: imports, ``from_pretrained`` arguments, family checks,
and the missing-folder message of ``qwen3vl chat --model``."""
from __future__ import annotations

import os

import pytest
import torch

import qwen3vl
from model_inputs import Builder, batch
from qwen3vl.cli import main
from qwen3vl.engine.compat import CompatError, resolve_device_map
from qwen3vl.random_checkpoint import TINY_MOE_CONFIG, random_tensors, write_checkpoint


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory) -> str:
    return write_checkpoint(str(tmp_path_factory.mktemp("moe_compat")), TINY_MOE_CONFIG,
                            random_tensors(TINY_MOE_CONFIG, seed=7))


def test_names_import_like_transformers():
    from qwen3vl import (AutoModelForImageTextToText, AutoProcessor, Qwen3VLForConditionalGeneration,
                         Qwen3VLMoeForConditionalGeneration)
    from qwen3vl.processor import Processor
    assert AutoProcessor is Processor
    for cls in (AutoModelForImageTextToText, Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration):
        assert issubclass(cls, qwen3vl.Qwen3VL)
    assert "process_vision_info" in qwen3vl.__all__


@pytest.mark.parametrize("device_map", [None, "auto", "cpu", {"": "cpu"}, torch.device("cpu")])
@pytest.mark.parametrize("attn", [None, "sdpa", "eager"])
def test_from_pretrained_transformers_arguments(tiny_ckpt, device_map, attn):
    if device_map in (None, "auto") and torch.cuda.is_available():
        pytest.skip("auto picks CUDA here")
    model = qwen3vl.Qwen3VLForConditionalGeneration.from_pretrained(
        tiny_ckpt, torch_dtype=torch.float32, device_map=device_map, attn_implementation=attn)
    assert model.device.type == "cpu" and model.dtype == torch.float32
    base = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype=torch.float32)
    inputs = batch(Builder(1).text(5).image(8, 12).text(4))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, rtol=0, atol=0)


def test_dtype_spellings(tiny_ckpt):
    cls = qwen3vl.AutoModelForImageTextToText
    assert cls.from_pretrained(tiny_ckpt, dtype="bfloat16").dtype == torch.bfloat16
    assert cls.from_pretrained(tiny_ckpt, dtype=torch.float32, torch_dtype=torch.float32).dtype == torch.float32
    with pytest.raises(CompatError, match="disagree"):
        cls.from_pretrained(tiny_ckpt, dtype=torch.float32, torch_dtype=torch.bfloat16)


def test_unsupported_arguments_are_named(tiny_ckpt):
    cls = qwen3vl.Qwen3VLForConditionalGeneration
    with pytest.raises(CompatError, match="flash_attention_2.*sdpa.*eager"):
        cls.from_pretrained(tiny_ckpt, attn_implementation="flash_attention_2")
    with pytest.raises(CompatError, match="whole-model map"):
        cls.from_pretrained(tiny_ckpt, device_map={"model.visual": "cpu", "lm_head": "cpu"})
    with pytest.raises(CompatError, match="load_in_8bit"):
        cls.from_pretrained(tiny_ckpt, load_in_8bit=True)
    assert cls.from_pretrained(tiny_ckpt, trust_remote_code=True, low_cpu_mem_usage=True).device.type == "cpu"


def test_device_map_values():
    assert resolve_device_map("cpu") == torch.device("cpu")
    assert resolve_device_map({"": "cpu"}) == torch.device("cpu")
    with pytest.raises(CompatError, match="not a device"):
        resolve_device_map("balanced_gpu")
    if not torch.cuda.is_available():
        with pytest.raises(CompatError, match="CUDA is not available"):
            resolve_device_map("cuda")
        with pytest.raises(CompatError, match="CUDA is not available"):
            resolve_device_map(0)


def test_family_mismatch_errors(tiny_ckpt, moe_ckpt):
    with pytest.raises(CompatError, match="MoE checkpoint.*Qwen3VLMoeForConditionalGeneration"):
        qwen3vl.Qwen3VLForConditionalGeneration.from_pretrained(moe_ckpt)
    with pytest.raises(CompatError, match="dense checkpoint.*Qwen3VLForConditionalGeneration"):
        qwen3vl.Qwen3VLMoeForConditionalGeneration.from_pretrained(tiny_ckpt)
    moe = qwen3vl.Qwen3VLMoeForConditionalGeneration.from_pretrained(moe_ckpt, dtype="float32")
    assert moe.config.is_moe
    assert qwen3vl.AutoModelForImageTextToText.from_pretrained(moe_ckpt).config.is_moe
    assert not qwen3vl.AutoModelForImageTextToText.from_pretrained(tiny_ckpt).config.is_moe


@pytest.mark.parametrize("path", ["/abs/missing/dir", "./missing_dir", "../missing_dir", "~/missing_dir",
                                  "tests/missing_dir"])
def test_chat_missing_folder_message(path, capsys):
    assert main(["chat", "--model", path, "hi"]) == 1
    err = capsys.readouterr().err
    assert f"no such folder: {path}" in err and "hub" not in err.lower()


def test_missing_folder_from_pretrained(tmp_path):
    missing = os.path.join(str(tmp_path), "nope")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        qwen3vl.Qwen3VLForConditionalGeneration.from_pretrained(missing)
