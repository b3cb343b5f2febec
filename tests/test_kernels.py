"""Compiled CPU kernels (qwen3vl.kernels): the matrix-vector kernels agree with an fp32
dequantization of the same weights for 1..8 rows, odd shapes and both activation dtypes;
QuantLinear uses them when they load and keeps the stock kernels otherwise; the pointwise passes
match the eager ops they replace (bit for bit where the rounding steps are the same)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qwen3vl import kernels
from qwen3vl.engine.kv_cache import KVCache, Scatter, Window
from qwen3vl.quant import QuantLinear

needs_ext = pytest.mark.skipif(not kernels.available(), reason=f"no compiled kernels: {kernels.unavailable_reason()}")


def rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


def quantized(mode, n, k, group=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = QuantLinear(k, n, mode, group)
    lin.load_weight(None, torch.randn(n, k, generator=g) * 0.02)
    lin.finalize()
    return lin


def fp32_weight(lin):
    """The weight the kernels compute with, in float64 (dequantized() rounds it to bf16)."""
    if lin.mode == "int8":
        return lin.qweight.double() * lin.scales.double()
    n, k, gs = lin.out_features, lin.in_features, lin.group_size
    codes = torch.stack((lin.qweight & 0xF, lin.qweight >> 4), -1).view(n, k // gs, gs).double()
    return ((codes - 8) * lin.scales.double()[..., None] + lin.zeros.double()[..., None]).view(n, k)


def kernel_activations(lin, x):
    """The activations the kernel multiplies, in float64, rounded as gemv.cpp rounds them (absmax
    scale, round half to even): int8 to int16 per row, int4 to int8 per block of 128."""
    x = x.float()
    width, limit = (x.shape[1], 32767) if lin.mode == "int8" else (128, 127)
    out = torch.empty_like(x)
    for k in range(0, x.shape[1], width):
        blk = x[:, k : k + width]
        amax = blk.abs().amax(1, keepdim=True)
        scale = torch.where(amax > 0, amax / limit, torch.ones_like(amax))
        out[:, k : k + width] = torch.round(blk * (1 / scale)).clamp(-limit, limit) * scale
    return out.double()


def run_kernel(lin, x):
    if lin.mode == "int8":
        return kernels.int8_gemv(x, lin.qweight, lin.scales)
    return kernels.int4_gemv(x, lin.qweight, lin.scales, lin.zeros, lin.group_size)


# bf16 results carry bf16 output rounding (2^-9); fp32 results only fp32 accumulation error.
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-3}
# Against the exact activations: int4 adds its int8 activation rounding (~0.3 % rms per element).
ACT_TOL = {"int8": 5e-3, "int4": 2e-2}
# (N, K): N not a multiple of any row unroll; K with tails of every kind the format allows.
SHAPES = {"int8": [(37, 2000), (101, 96), (13, 7)],
          "int4": [(37, 2080), (101, 224), (13, 96)]}


@needs_ext
@pytest.mark.parametrize("mode,group", [("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_quantized_gemv_matches_fp32_dequantization(mode, group, dtype, m):
    for n, k in SHAPES[mode]:
        if k % group and mode == "int4":
            continue
        lin = quantized(mode, n, k, group)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
        y = run_kernel(lin, x)
        assert y.shape == (m, n) and y.dtype == dtype
        assert rel(y, kernel_activations(lin, x) @ fp32_weight(lin).t()) < TOL[dtype]
        assert rel(y, x.double() @ fp32_weight(lin).t()) < ACT_TOL[mode]


# (N, K, G) for the AMX paths: N with a remainder below 16 rows; int4: each tile width (G 32: 32 k
# per tile, 64 and 128: 64) and one with an odd number of groups (kept on the vpdpbusd kernel);
# int8: K beyond one int32 sum (16384) and K not a multiple of 64 (kept on the vpdpwssd kernel).
AMX_SHAPES = {"int4": [(277, 384, 32), (256, 512, 64), (40, 1024, 64), (96, 256, 128), (48, 384, 128)],
              "int8": [(277, 384, 0), (32, 16448, 0), (40, 200, 0), (16, 2048, 0)]}


@needs_ext
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [5, 8, 13])  # 13: a pass of 8 rows, then one of 5
def test_amx_paths_match_fp32_and_the_vnni_path(mode, dtype, m):
    if not kernels.amx():
        pytest.skip("no AMX tiles on this CPU")
    for n, k, group in AMX_SHAPES[mode]:
        lin = quantized(mode, n, k, group or 64, seed=n)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
        if mode == "int8":
            x[:, 5] = x.abs().max() * 2  # a row maximum: its int16 code 32767 has hi byte 127, lo byte 255
        y = run_kernel(lin, x)
        assert y.shape == (m, n) and y.dtype == dtype
        assert rel(y, kernel_activations(lin, x) @ fp32_weight(lin).t()) < TOL[dtype]
        assert kernels.amx(False) is False
        try:
            y_vnni = run_kernel(lin, x)
        finally:
            assert kernels.amx(True) is True
        # Same integer products and fp32 scaling, summed in another order.
        assert rel(y, y_vnni.double()) < (1e-5 if dtype == torch.float32 else 2**-8)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 11])
def test_bf16_gemv(dtype, m):
    g = torch.Generator().manual_seed(2)
    for n, k in [(37, 2050), (101, 96), (13, 7)]:
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(m, k, generator=g).to(dtype)
        y = kernels.bf16_gemv(x, w)
        assert y.shape == (m, n) and y.dtype == dtype
        assert rel(y, x.double() @ w.double().t()) < TOL[dtype]


@needs_ext
@pytest.mark.parametrize("mode,group", [("int8", 64), ("int4", 32), ("int4", 128)])
def test_dequant_kernels_match_fp32_dequantization(mode, group):
    """The prefill path's bf16 weight is the fp32 dequantization rounded once (within 1 ulp: the
    kernel folds the -8 offset into the zero point)."""
    for n, k in [(37, 256), (5, 384)] + ([(3, 70)] if mode == "int8" else []):  # int8: K tail
        lin = quantized(mode, n, k, group)
        w = lin.dequantized()
        assert w.dtype == torch.bfloat16 and w.shape == (n, k)
        ref = fp32_weight(lin)
        assert ((w.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-12).all()


@needs_ext
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quant_linear_uses_the_kernels(mode, monkeypatch):
    lin = quantized(mode, 96, 256)
    assert lin.ext_kernels and lin.packed is None  # no stock int4 copy kept
    calls = []
    name = f"{mode}_gemv"
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 5, 256)  # 10 rows: prefill path
    ref = x.double() @ fp32_weight(lin).t()
    assert rel(lin(x), ref) < 2e-2 and not calls
    y = lin(x[:1, :4])  # 4 rows: decode path
    expected = kernel_activations(lin, x[0, :4]) @ fp32_weight(lin).t()
    assert calls and y.shape == (1, 4, 96) and rel(y[0], expected) < TOL[torch.float32]
    yb = lin(x[0, :1].bfloat16())
    expected = kernel_activations(lin, x[0, :1].bfloat16()) @ fp32_weight(lin).t()
    assert yb.dtype == torch.bfloat16 and rel(yb, expected) < 5e-3


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quant_linear_without_the_kernels_keeps_stock_path(mode, monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    lin = quantized(mode, 64, 256)
    assert not lin.ext_kernels and (mode == "int8" or lin.packed is not None)
    x = torch.randn(3, 256)
    assert rel(lin(x), x.bfloat16().double() @ lin.dequantized().double().t()) < 2e-2


def test_no_ext_env_falls_back(tmp_path):
    code = ("import torch, qwen3vl.kernels as k; assert not k.available(); print(k.unavailable_reason());"
            "x = torch.randn(2, 64); w = torch.randn(16, 64).bfloat16();"
            "assert torch.allclose(k.bf16_gemv(x, w), x @ w.float().t(), atol=1e-4)")
    env = dict(os.environ, QWEN3VL_NO_EXT="1", QWEN3VL_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "QWEN3VL_NO_EXT=1" in out.stdout and "using stock CPU kernels (QWEN3VL_NO_EXT=1)" in out.stderr
    assert not os.listdir(tmp_path)  # nothing was built


def test_python_fallbacks_match_kernels(monkeypatch):
    """The pure-PyTorch versions (used without the extension) compute the same products, with
    the activations exact (the int4 kernel rounds them to int8: compared as such above)."""
    lin8, lin4 = quantized("int8", 24, 96), quantized("int4", 24, 96, 32)
    x = torch.randn(3, 96)
    expected = [x.double() @ fp32_weight(lin).t() for lin in (lin8, lin4)]
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert rel(run_kernel(lin8, x), expected[0]) < 1e-5
    assert rel(run_kernel(lin4, x), expected[1]) < 1e-5


def test_cpu_without_avx512_bf16_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: ("Some CPU", "fpu avx2 avx512f"))
    assert kernels._build() == "CPU lacks avx512bw, avx512vl, avx512_bf16, avx512_vnni"


def test_build_dir_depends_on_cpu_and_source(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN3VL_HOME", str(tmp_path))
    a = kernels._build_dir(b"src", "CPU A", "avx512f avx512_bf16")
    assert a.startswith(os.path.join(str(tmp_path), "torch_extensions"))
    assert a == kernels._build_dir(b"src", "CPU A", "avx512f avx512_bf16")
    assert a != kernels._build_dir(b"src", "CPU A", "avx512f avx512_bf16 amx_tile")
    assert a != kernels._build_dir(b"src", "CPU B", "avx512f avx512_bf16")
    assert a != kernels._build_dir(b"src2", "CPU A", "avx512f avx512_bf16")


@needs_ext
def test_bf16_decoder_linears_use_the_kernel(tiny_ckpt, monkeypatch):
    """A bf16 model on CPU routes 1-4 row products of its linears (decoder and lm_head) through
    bf16_gemv, chosen at load; larger batches and fp32 models keep the stock GEMM."""
    import qwen3vl
    from qwen3vl.model.text import Linear

    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype="bfloat16")
    assert model.lm_head.use_kernels and model.model.language_model.layers[0].self_attn.qkv_proj.use_kernels
    assert not any(m.use_kernels for m in qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt).modules() if isinstance(m, Linear))
    calls = []
    real = kernels.bf16_gemv
    monkeypatch.setattr(kernels, "bf16_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    wide = Linear(512, 96, bias=False).bfloat16()
    wide.use_kernels = True
    # Narrow inputs (K < 256: the tiny lm_head) use the kernel for 1-2 rows only, where it wins.
    for lin, expected in ((model.lm_head, [1, 2]), (wide, [1, 2, 4])):
        calls.clear()
        for rows in (1, 2, 4, 5, 9):
            x = torch.randn(rows, lin.in_features).bfloat16()
            with torch.no_grad():
                y = lin(x)
            assert y.dtype == torch.bfloat16 and rel(y, x.double() @ lin.weight.detach().double().t()) < 5e-3
        assert calls == expected


def stacked(mode, e, n, k, group=64):
    """E quantized matrices as QuantExperts stores them, and their fp64 weights."""
    from qwen3vl.quant import QuantExperts

    g = torch.Generator().manual_seed(3)
    ex = QuantExperts(e, k, n, mode, group)
    ex.load_weight(None, (torch.randn(e, k, n, generator=g) * 0.02).transpose(1, 2))  # released layout, strided
    ex.finalize()
    per = [quantized_view(ex, i) for i in range(e)]
    return ex, per


def quantized_view(ex, i):
    lin = QuantLinear(ex.in_features, ex.out_features, ex.mode, ex.group_size)
    lin.qweight, lin.scales, lin.zeros = ex.qweight[i], ex.scales[i], ex.zeros[i]
    return fp32_weight(lin)


@needs_ext
@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_kernels_match_one_matrix_per_row(mode, dtype):
    """y[j] = x[j] @ W[idx[j]].T for a stack of matrices (a MoE token's experts), repeats and
    any order allowed; a single row of x is shared by all products."""
    e, n, k = 5, 70, 256
    if mode == "bf16":
        w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(4)).bfloat16()
        per = [w[i].double() for i in range(e)]
        run = lambda x, idx: kernels.bf16_gemv_multi(x, w, idx)  # noqa: E731
    else:
        ex, per = stacked(mode, e, n, k, 32 if mode == "int4" else 64)
        run = ex.linear_multi
    idx = torch.tensor([4, 0, 2, 2])
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(5)).to(dtype)
    for xs in (x, x[:1]):
        y = run(xs, idx)
        assert y.shape == (4, n) and y.dtype == dtype
        xa = kernel_activations(ex, xs) if mode == "int4" else xs.double()
        ref = torch.stack([xa[min(j, len(xs) - 1)] @ per[i].t() for j, i in enumerate(idx.tolist())])
        assert rel(y, ref) < TOL[dtype]


@needs_ext
def test_multi_kernels_reject_bad_indices():
    w = torch.zeros(3, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"matrix index 3 out of range \[0, 3\)"):
        kernels.bf16_gemv_multi(torch.zeros(1, 64), w, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="1 or len\\(idx\\) rows"):
        kernels.bf16_gemv_multi(torch.zeros(3, 64), w, torch.tensor([0, 1]))


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
    got = kernels.rms_norm_bf16(x, w, 1e-6)
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
    got = kernels.decode_attention(q, k, v, mask)
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
        kernels.decode_attention(q, kv, kv)
    with pytest.raises(RuntimeError, match="mask must be"):
        kernels.decode_attention(q[:, :4], kv, kv, torch.ones(1, 1, 1, 7, dtype=torch.bool))


@needs_ext
@pytest.mark.parametrize("d", [32, 128, 40])
def test_rms_norm_rope_is_bit_identical_to_the_separate_ops(d):
    """The fused decode pass rounds after every step like the eager ops: identical bits."""
    g = torch.Generator().manual_seed(8)
    qkv = (torch.randn(2, 3, 9, d, generator=g) * 3).bfloat16()
    x = qkv[:, :, :6]  # the q/k heads of a fused projection: a strided view
    w = (torch.rand(6, d, generator=g) + 0.5).bfloat16()
    cos, rot_sin = (torch.randn(2, 3, 1, d, generator=g).bfloat16() for _ in range(2))
    n = kernels.rms_norm_bf16(x, w, 1e-6)
    assert torch.equal(kernels.rms_norm_rope_bf16(x, w, 1e-6, cos, rot_sin), n * cos + n.roll(d // 2, -1) * rot_sin)


@needs_ext
@pytest.mark.parametrize("shape", [(784, 4096), (3, 37), (1, 5)])  # tails of a vector and of a thread's range
def test_gelu_tanh_matches_the_stock_kernel(shape):
    """Equal to F.gelu(approximate="tanh") up to its own rounding: the stock bf16 kernel loses
    accuracy for x < -4 (1 + tanh cancels), where both are < 1e-4 in magnitude; elsewhere within
    a bf16 unit of it, and within a unit of the exact value everywhere."""
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(shape, generator=g) * 3).bfloat16()
    x.view(-1)[:3] = torch.tensor([-100.0, 100.0, 0.0])
    got = kernels.gelu_tanh_bf16(x)
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
    from qwen3vl.model.rope import apply_rotary

    g = torch.Generator().manual_seed(11)
    qkv = (torch.randn(n, 3 * h * d, generator=g) * 2).to(dtype).view(n, 3, h, d)
    cos, sin = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    q, k = kernels.vision_rope(qkv, cos, sin)
    for i, got in enumerate((q, k)):
        expected = apply_rotary(qkv[:, i].float(), cos[:, None], sin[:, None]).to(dtype)
        assert got.shape == (n, h, d) and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, expected)


@needs_ext
def test_silu_mul_matches_the_separate_ops():
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(300, 2 * 1000, generator=g) * 4).bfloat16()  # 300 rows: split across threads
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # exp under/overflow must not give NaN
    gate, up = x.chunk(2, -1)
    expected = torch.nn.functional.silu(gate) * up
    got = kernels.silu_mul_bf16(x)
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
    assert steps and all(m.cpu_kernels for m in steps)
    assert not any(m.cpu_kernels for m in qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt).modules()
                   if isinstance(m, (Attention, MLP)))
    calls = []
    for name in ("decode_attention", "rms_norm_rope_bf16", "silu_mul_bf16"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    ids = torch.tensor([[5, 17, 300, 2, 44, 9], [0, 0, 7, 7, 8, 1000]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])  # padded row: the decode mask path
    with torch.inference_mode():
        fused = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        assert set(calls) == {"decode_attention", "rms_norm_rope_bf16", "silu_mul_bf16"}
        for m in steps:
            m.cpu_kernels = False
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
    assert attn and all(m.cpu_kernels for m in attn)
    assert all(m.cpu_kernels == (dtype == "bfloat16") for m in mlps)
    calls = []
    for name in ("vision_rope", "gelu_tanh_bf16"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    g = torch.Generator().manual_seed(12)
    pixels = torch.randn(2 * 8 * 12 + 4 * 4, 3 * 2 * 16 * 16, generator=g)
    grid = torch.tensor([[2, 8, 12], [1, 4, 4]])  # a 2-slice video and an image: two segment lengths
    with torch.inference_mode():
        fused, fused_deep = vis(pixels, grid)
        assert set(calls) == ({"vision_rope", "gelu_tanh_bf16"} if dtype == "bfloat16" else {"vision_rope"})
        for m in attn + mlps:
            m.cpu_kernels = False
        plain, plain_deep = vis(pixels, grid)
    for a, b in zip([fused, *fused_deep], [plain, *plain_deep]):
        if dtype == "float32":
            assert torch.equal(a, b)
        else:
            assert rel(a.float(), b.float()) < 2e-2


# Decode scenarios for the one-call step: (prefills as (slot, length, padded prefix), then per step
# the cache window): one sequence through a Window (slot 1) or a Scatter (slot 0), two sequences
# in lock-step with a padded row (masked), two sequences at different lengths through a Scatter.
DECODE_CASES = {
    "window": ([(1, 5, 0)], lambda cache, i: Window(cache, slice(1, 2), 5 + i, None, 1)),
    "scatter": ([(0, 5, 0)], lambda cache, i: Scatter(cache, torch.tensor([5 + i]), 6 + i)),
    "window2": ([(0, 5, 0), (1, 5, 2)], lambda cache, i: Window(cache, slice(0, 2), 5 + i, None, 1)),
    "scatter2": ([(0, 5, 0), (1, 3, 0)], lambda cache, i: Scatter(cache, torch.tensor([5 + i, 3 + i]), 6 + i)),
}


def _decode_run(model, path: str, case: str):
    """Prefill random embeddings, then 3 one-token steps through the decoder, the steps as one call
    for the stack ("stack"), one per layer ("layers") or module by module ("modules") -> (hidden
    states of every call, the K and V cache)."""
    from qwen3vl.model.text import AttnContext

    dec = model.model.language_model
    dec.enable_step_kernels()
    if path != "stack":
        dec._steps = None
    if path == "modules":
        for layer in dec.layers:
            layer._step = None
    cfg = model.config.text
    prefills, window = DECODE_CASES[case]
    g = torch.Generator().manual_seed(0)
    cache = KVCache(cfg, 2, 16, torch.bfloat16, "cpu")
    outs = []
    with torch.inference_mode():
        for slot, t, pad in prefills:
            x = torch.randn(1, t, cfg.hidden_size, generator=g).bfloat16()
            cos, sin = model.rope(torch.arange(t)[None, None].expand(3, 1, t), torch.bfloat16)
            valid = (torch.arange(t) >= pad)[None] if pad else None
            win = Window(cache, slice(slot, slot + 1), 0, valid, t)
            outs.append(dec(x, AttnContext(cos, sin, win.mask, win)))
        for i in range(3):
            b = len(prefills)
            x = torch.randn(b, 1, cfg.hidden_size, generator=g).bfloat16()
            pos = torch.tensor([t + i for _, t, _ in prefills]).view(1, b, 1).expand(3, b, 1)
            cos, sin = model.rope(pos, torch.bfloat16)
            win = window(cache, i)
            outs.append(dec(x, AttnContext(cos, sin, win.mask, win)))
    return outs, cache.k.clone(), cache.v.clone()


@needs_ext
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_layers_are_bit_identical_to_the_module_path(tiny_ckpt, quant, case, monkeypatch):
    """Decode runs the dense layers in one compiled call (kernels.decode_layers) in every weight
    format, for the whole stack or (in a model mixing in MoE layers) per layer, for one sequence
    or several (lock-step with padding masks, or at different lengths): same kernels, same order,
    so hidden states and the KV cache match the module path bit for bit."""
    import qwen3vl

    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype="bfloat16", quantization=quant, group_size=32)
    layers = model.model.language_model.layers
    assert model.model.language_model._steps is not None and all(layer._step is not None for layer in layers)
    prefills = DECODE_CASES[case][0]
    slot, lengths, masked = prefills[0][0], [t for _, t, _ in prefills], case != "window" and case != "scatter"
    calls = []
    real = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers",
                        lambda *a: calls.append((a[5], list(a[6]), a[7], a[8] is not None, a[10][::5])) or real(*a))
    runs = {}
    for path, expected in (("stack", [[0, 1, 2, 3]]), ("layers", [[0], [1], [2], [3]]), ("modules", [])):
        calls.clear()
        runs[path] = _decode_run(model, path, case)
        # only the one-token calls, at their slots and cache indices, through every layer once
        assert calls == [(slot, [t + i for t in lengths], max(lengths) + i + 1, masked, lay)
                         for i in range(3) for lay in expected]
    for path in ("stack", "layers"):
        for a, b in zip(runs[path][0], runs["modules"][0]):
            assert torch.equal(a, b)
        assert torch.equal(runs[path][1], runs["modules"][1]) and torch.equal(runs[path][2], runs["modules"][2])
    assert runs["stack"][1][:, slot, :, max(lengths) + 2].abs().sum() > 0  # the last step's keys were written


@needs_ext
def test_decode_layers_reject_bad_arguments(tiny_ckpt):
    import qwen3vl

    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype="bfloat16")
    tensors, layout, group, _ = model.model.language_model._steps
    cfg = model.config.text
    k = torch.zeros(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 8, cfg.head_dim, dtype=torch.bfloat16)
    x = torch.zeros(1, 1, cfg.hidden_size, dtype=torch.bfloat16)
    cos = torch.ones(1, 1, 1, cfg.head_dim, dtype=torch.bfloat16)

    def call(**kw):
        args = dict(x=x, cos=cos, rot_sin=cos, k_cache=k, v_cache=k.clone(), slot=0, pos=[3], end=4, mask=None,
                    weights=tensors, layout=layout, eps=1e-6, group_size=group)
        args.update(kw)
        return kernels.decode_layers(*args.values())

    assert call().shape == x.shape
    for kw, msg in ((dict(pos=[8], end=9), "inside them"), (dict(slot=1), "inside them"), (dict(pos=[4]), "pos < end"),
                    (dict(pos=[1, 2]), "inside them"), (dict(layout=layout[:-1]), "5 numbers"),
                    (dict(weights=tensors[:-1]), "fewer weights"), (dict(weights=tensors + tensors[:1]), "more weights"),
                    (dict(x=x.float()), "bfloat16"), (dict(layout=[9] + layout[1:]), "layer index"),
                    (dict(layout=[0, 0] + layout[2:]), "1, 2 or 3 tensors"),
                    (dict(mask=torch.ones(1, 1, 1, 3, dtype=torch.bool)), "mask")):
        with pytest.raises(RuntimeError, match=msg):
            call(**kw)


@needs_ext
def test_decode_layer_only_where_it_applies(tiny_ckpt):
    """The one-call step takes one new token per row (no prefill), at most as many rows as every
    projection gives the compiled kernels (bf16 with 64 inputs: 2), dense layers on the compiled
    kernels; moved or converted weights drop it (and still run)."""
    import qwen3vl
    from qwen3vl.model.text import AttnContext

    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype="bfloat16")
    cfg = model.config.text
    cache = KVCache(cfg, 3, 16, torch.bfloat16, "cpu")
    assert Window(cache, slice(0, 1), 0, None, 4).decode_rows is None  # prefill
    assert Window(cache, slice(1, 3), 4, None, 1).decode_rows == (1, [4, 4], 5)
    assert Scatter(cache, torch.tensor([4, 2]), 5).decode_rows == (0, [4, 2], 5)
    dec = model.model.language_model
    assert dec._steps.rows == 2 and model.from_pretrained(tiny_ckpt, dtype="bfloat16", quantization="int8"
                                                          ).model.language_model._steps.rows == 8
    calls = []
    real = kernels.decode_layers
    kernels.decode_layers = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.inference_mode():
            for b in (2, 3):
                win = Window(cache, slice(0, b), 4, None, 1)
                cos, sin = model.rope(torch.full((3, b, 1), 4), torch.bfloat16)
                dec(torch.randn(b, 1, cfg.hidden_size).bfloat16(), AttnContext(cos, sin, win.mask, win))
    finally:
        kernels.decode_layers = real
    assert calls == [1]  # 2 rows in one call, 3 rows module by module
    assert qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt).model.language_model.layers[0]._step is None  # fp32
    model.float()
    dec = model.model.language_model
    assert dec._steps is None and all(layer._step is None for layer in dec.layers)
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False).shape == (1, 5)
