"""fp32 logits parity with the reference implementation on tiny released-layout checkpoints."""
from __future__ import annotations

import pytest
import torch

import qwen3vl
from conftest import load_reference
from model_inputs import Builder, batch, mm_token_type_ids
from qwen3vl.kernels import Ops
from qwen3vl.model.text import MLP, Attention
from qwen3vl.model.vision import VisionAttention, VisionMLP

TOL = 1e-5


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach(), ref.detach()
    return float((ours - ref).abs().max() / ref.abs().max())


def compare(path: str, inputs: dict) -> float:
    ours = qwen3vl.Qwen3VL.from_pretrained(path, dtype=torch.float32)
    ref = load_reference(path)
    with torch.no_grad():
        expected = ref(**inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"])).logits
    got = ours(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert got.shape == expected.shape
    return rel_err(got[valid], expected[valid])


CASES = {
    "text_only": lambda: batch(Builder(0).text(24)),
    "one_image": lambda: batch(Builder(1).text(5).image(8, 12).text(7)),
    "two_images_different_sizes": lambda: batch(Builder(2).text(3).image(8, 12).text(4).image(12, 6).text(5)),
    # Same-size images that are not adjacent in the pixel rows take the gather path in attention.
    "three_images_sizes_a_b_a": lambda: batch(Builder(7).text(2).image(8, 8).text(2).image(4, 12).text(2).image(8, 8)),
    "video_3_slices_plus_image": lambda: batch(Builder(3).text(4).video(3, 8, 8).text(2).image(6, 10).text(3)),
    "left_padded_mixed_batch": lambda: batch(
        Builder(4).text(3).image(8, 12).text(6),
        Builder(5).text(2).video(3, 6, 8).text(4),
        Builder(6).text(9),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_reference(tiny_ckpt, case):
    assert compare(tiny_ckpt, CASES[case]()) <= TOL


@pytest.mark.parametrize("case", ["text_only", "video_3_slices_plus_image", "left_padded_mixed_batch"])
def test_tied_sharded_checkpoint_matches_reference(tiny_tied_sharded_ckpt, case):
    model = qwen3vl.Qwen3VL.from_pretrained(tiny_tied_sharded_ckpt)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert compare(tiny_tied_sharded_ckpt, CASES[case]()) <= TOL


def test_logits_to_keep(tiny_ckpt):
    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt)
    inputs = CASES["one_image"]()
    full = model(**inputs).logits
    last = model(**inputs, logits_to_keep=1).logits
    assert last.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)


def test_bfloat16_close_to_float32(tiny_ckpt):
    inputs = CASES["video_3_slices_plus_image"]()
    f32 = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype="float32")(**inputs).logits
    bf16_model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    assert bf16_model.dtype == torch.bfloat16
    bf16 = bf16_model(**inputs).logits.float()
    assert torch.isfinite(bf16).all()
    assert rel_err(bf16, f32) <= 5e-2


def _fused_passes_off(ops: Ops) -> Ops:
    """``ops`` with the passes the compiled kernels fuse (q/k norm + rotary, SwiGLU, the vision
    rotary embedding, tanh-GELU, decode attention) done by separate ops again; the plain RMS norm
    stays as ``ops`` has it."""
    plain = Ops("fused passes off", ops.compiled - {"rms_norm_rope", "silu_mul", "vision_rope", "gelu",
                                                    "decode_attention"}, ops.amx)

    def rms_norm_then_rope(x, weight, eps, cos, rot_sin):
        n = plain.rms_norm(x, weight, eps)
        return n * cos + n.roll(x.shape[-1] // 2, -1) * rot_sin

    plain.rms_norm_rope = rms_norm_then_rope
    return plain


@pytest.mark.parametrize("case", ["video_3_slices_plus_image", "left_padded_mixed_batch"])
def test_bfloat16_matches_reference_bfloat16(tiny_ckpt, case):
    """bf16 against the reference in bf16: within the reference's own bf16 error (vs its fp32),
    the compiled CPU passes (norms, rotary embeddings, SwiGLU, GELU) change next to nothing, and
    the model on the reference ops alone differs by about one bf16 unit of the largest logit (the
    per-head q/k RMS norm summed in another order)."""
    inputs = CASES[case]()
    mm = mm_token_type_ids(inputs["input_ids"])
    valid = inputs["attention_mask"].bool()
    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    ops = model.select_kernels()
    switchable = [m for m in model.modules() if isinstance(m, (Attention, MLP, VisionAttention, VisionMLP))]
    with torch.no_grad():
        f32 = load_reference(tiny_ckpt)(**inputs, mm_token_type_ids=mm).logits[valid]
        ref = load_reference(tiny_ckpt, dtype=torch.bfloat16)(**inputs, mm_token_type_ids=mm).logits.float()[valid]
        ours = model(**inputs).logits.float()[valid]
        for m in switchable:
            m.use_ops(_fused_passes_off(ops))
        plain = model(**inputs).logits.float()[valid]
        model.select_kernels(compiled=False)
        reference_ops = model(**inputs).logits.float()[valid]
    assert rel_err(ours, ref) <= rel_err(ref, f32)
    assert rel_err(ours, plain) <= 2e-3
    assert rel_err(ours, reference_ops) <= 5e-3
