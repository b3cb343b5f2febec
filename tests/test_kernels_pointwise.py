"""Compiled pointwise passes and decode attention (qwen3vl.kernels): they match the eager ops they
replace (bit for bit where the rounding steps are the same), and the models route through them
(chosen at load, switched off by handing modules the reference ops)."""
from __future__ import annotations

import pytest
import torch

from qwen3vl import kernels
from qwen3vl.kernels import compiled, reference
from test_kernels import needs_ext, rel


@needs_ext
@pytest.mark.parametrize("shape,heads", [((1, 1, 2048), 0), ((8, 1, 40, 128), 40), ((3, 70), 0), ((2, 5, 33), 0),
                                         ((1, 300, 2048), 0), ((1, 97, 24, 128), 24)])  # prefill: rows in threads
def test_rms_norm_bf16_matches_the_model_definition(shape, heads):
    """One weight for all rows, or per head (row r uses weight row r % heads); same arithmetic as
    the stock path, so only a rare double-rounding differs (by a unit in the last place)."""
    g = torch.Generator().manual_seed(6)
    d = shape[-1]
    x = (torch.randn(shape, generator=g) * 3).bfloat16()
    w = (torch.rand((heads, d) if heads else (d,), generator=g) + 0.5).bfloat16()
    expected = w * torch.nn.functional.rms_norm(x.float(), (d,), None, 1e-6).to(torch.bfloat16)
    got = compiled.rms_norm(x, w, 1e-6)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    assert float((got != expected).float().mean()) < 1e-3
    assert bool(((got.float() - expected.float()).abs() <= expected.float().abs() * 2**-6).all())


@needs_ext
@pytest.mark.parametrize("b,h,hkv,t,length,d", [(1, 16, 8, 1, 256, 128), (3, 4, 2, 1, 37, 32), (2, 6, 2, 3, 21, 96),
                                                (1, 4, 4, 2, 5, 256)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_sdpa(b, h, hkv, t, length, d, masked):
    """Grouped heads, strided cache views, masks with broadcast strides: equal to fp32 SDPA up to
    the bf16 rounding of the output (what SDPA's own bf16 kernel reaches too)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, t, h, d, generator=g).bfloat16().transpose(1, 2)  # (B, H, T, D), strided like the model's
    cache = torch.randn(2, b, hkv, length + 9, d, generator=g).bfloat16()
    k, v = cache[0, :, :, :length], cache[1, :, :, :length]  # (B, Hkv, L, D) views of a longer cache
    mask = None
    if masked:
        mask = torch.rand(b, 1, 1, length, generator=g) > 0.4
        mask[..., -1] = True
        mask = mask.expand(b, 1, t, length)
    got = compiled.decode_attention(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                           enable_gqa=h != hkv)
    assert got.shape == (b, h, t, d) and got.dtype == torch.bfloat16
    assert got.transpose(1, 2).is_contiguous()  # (B, T, H, D) underneath: o_proj reads it without a copy
    err = (got.float() - ref).abs()
    assert bool((err <= ref.abs() * 2**-8 + 1e-6).all()), float(err.max())


@needs_ext
def test_decode_attention_rejects_bad_shapes():
    q, kv = torch.zeros(1, 6, 1, 32, dtype=torch.bfloat16), torch.zeros(1, 4, 8, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="H % Hkv"):
        compiled.decode_attention(q, kv, kv)
    with pytest.raises(RuntimeError, match="mask must be"):
        compiled.decode_attention(q[:, :4], kv, kv, torch.ones(1, 1, 1, 7, dtype=torch.bool))


@needs_ext
@pytest.mark.parametrize("d", [32, 128, 40])
def test_rms_norm_rope_is_bit_identical_to_the_separate_ops(d):
    """The fused decode pass rounds after every step like the eager ops: identical bits."""
    g = torch.Generator().manual_seed(8)
    qkv = (torch.randn(2, 3, 9, d, generator=g) * 3).bfloat16()
    x = qkv[:, :, :6]  # the q/k heads of a fused projection: a strided view
    w = (torch.rand(6, d, generator=g) + 0.5).bfloat16()
    cos, rot_sin = (torch.randn(2, 3, 1, d, generator=g).bfloat16() for _ in range(2))
    n = compiled.rms_norm(x, w, 1e-6)
    assert torch.equal(compiled.rms_norm_rope(x, w, 1e-6, cos, rot_sin), n * cos + n.roll(d // 2, -1) * rot_sin)


@needs_ext
@pytest.mark.parametrize("shape", [(784, 4096), (3, 37), (1, 5)])  # tails of a vector and of a thread's range
def test_gelu_tanh_matches_the_stock_kernel(shape):
    """Equal to F.gelu(approximate="tanh") up to its own rounding: the stock bf16 kernel loses
    accuracy for x < -4 (1 + tanh cancels), where both are < 1e-4 in magnitude; elsewhere within
    a bf16 unit of it, and within a unit of the exact value everywhere."""
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(shape, generator=g) * 3).bfloat16()
    x.view(-1)[:3] = torch.tensor([-100.0, 100.0, 0.0])
    got = compiled.gelu(x)
    stock = torch.nn.functional.gelu(x, approximate="tanh").float()
    xd = x.double()
    exact = xd * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (xd + 0.044715 * xd**3))  # = 0.5 x (1 + tanh(u))
    assert got.shape == x.shape and got.dtype == torch.bfloat16 and not bool(got.isnan().any())
    assert bool(((got.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-30).all())
    big = x.float() > -4
    assert bool(((got.float() - stock).abs() <= stock.abs() * 2**-7)[big].all())
    assert bool(((got.float() - stock).abs() <= 1e-4).all())


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,h,d", [(784, 16, 64), (5, 3, 40), (9, 2, 32)])
def test_vision_rope_is_bit_identical_to_the_eager_ops(dtype, n, h, d):
    """q and k straight from the fused qkv output (a strided view), rotated in fp32 and rounded
    once, exactly like the reference's apply_rotary_pos_emb_vision."""
    g = torch.Generator().manual_seed(11)
    qkv = (torch.randn(n, 3 * h * d, generator=g) * 2).to(dtype).view(n, 3, h, d)
    cos, sin = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    q, k = compiled.vision_rope(qkv, cos, sin)
    for i, got in enumerate((q, k)):
        expected = reference.apply_rotary(qkv[:, i].float(), cos[:, None], sin[:, None]).to(dtype)
        assert got.shape == (n, h, d) and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, expected)


@needs_ext
def test_silu_mul_matches_the_separate_ops():
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(300, 2 * 1000, generator=g) * 4).bfloat16()  # 300 rows: split across threads
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # exp under/overflow must not give NaN
    gate, up = x.chunk(2, -1)
    expected = torch.nn.functional.silu(gate) * up
    got = compiled.silu_mul(x)
    assert got.shape == (300, 1000) and not bool(got.isnan().any())
    assert float((got != expected).float().mean()) < 1e-3
    assert bool(((got.float() - expected.float()).abs() <= expected.float().abs() * 2**-7).all())


@needs_ext
def test_bf16_model_decode_uses_the_fused_kernels(tiny_ckpt, monkeypatch):
    """A bf16 CPU model routes the modules' decode steps through the fused kernels and generates
    the same tokens as with them switched off; fp32 models never use them. (The one-call step,
    which calls the same kernels from C++, is switched off here: tested below.)"""
    import qwen3vl
    from qwen3vl.model.text import MLP, Attention

    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype="bfloat16")
    model.model.language_model._steps = None
    for layer in model.model.language_model.layers:
        layer._step = None
    steps = [m for m in model.modules() if isinstance(m, (Attention, MLP))]
    fused = lambda m: {"rms_norm_rope", "attention", "silu_mul"} & m.ops.compiled  # noqa: E731
    assert steps and all(fused(m) for m in steps)
    assert not any(fused(m) for m in qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt).modules()
                   if isinstance(m, (Attention, MLP)))
    calls = []
    ops = steps[0].ops
    for owner, name in ((compiled, "decode_attention"), (ops, "rms_norm_rope"), (ops, "silu_mul")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    ids = torch.tensor([[5, 17, 300, 2, 44, 9], [0, 0, 7, 7, 8, 1000]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])  # padded row: the decode mask path
    with torch.inference_mode():
        fused = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        assert set(calls) == {"decode_attention", "rms_norm_rope", "silu_mul"}
        for m in steps:
            m.use_ops(kernels.REFERENCE)
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(fused, plain)


@needs_ext
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vision_encoder_uses_the_pointwise_kernels(tiny_ckpt, monkeypatch, dtype):
    """The vision rotary pass in both dtypes (bit-identical: the same features with it off) and,
    in bf16, the tanh-GELU (same features within bf16 rounding)."""
    import qwen3vl
    from qwen3vl.model.vision import VisionAttention, VisionMLP

    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype=dtype)
    vis = model.model.visual
    attn = [m for m in vis.modules() if isinstance(m, VisionAttention)]
    mlps = [m for m in vis.modules() if isinstance(m, VisionMLP)]
    assert attn and all("vision_rope" in m.ops.compiled for m in attn)
    assert all(("gelu" in m.ops.compiled) == (dtype == "bfloat16") for m in mlps)
    calls = []
    for name in {"vision_rope", "gelu"} & attn[0].ops.compiled:  # count the compiled kernels' calls
        real = getattr(attn[0].ops, name)
        monkeypatch.setattr(attn[0].ops, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    g = torch.Generator().manual_seed(12)
    pixels = torch.randn(2 * 8 * 12 + 4 * 4, 3 * 2 * 16 * 16, generator=g)
    grid = torch.tensor([[2, 8, 12], [1, 4, 4]])  # a 2-slice video and an image: two segment lengths
    with torch.inference_mode():
        fused, fused_deep = vis(pixels, grid)
        assert set(calls) == ({"vision_rope", "gelu"} if dtype == "bfloat16" else {"vision_rope"})
        for m in attn + mlps:
            m.use_ops(kernels.REFERENCE)
        plain, plain_deep = vis(pixels, grid)
    for a, b in zip([fused, *fused_deep], [plain, *plain_deep]):
        if dtype == "float32":
            assert torch.equal(a, b)
        else:
            assert rel(a.float(), b.float()) < 2e-2
