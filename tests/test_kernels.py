"""Compiled CPU kernels (qwen3vl.kernels): building is explicit and the probe never builds; the
matrix-vector kernels agree with an fp32 dequantization of the same weights for 1..8 rows, odd
shapes and both activation dtypes; QuantLinear uses them when they load and keeps the stock
kernels otherwise; the facade hands them out per op. Pointwise passes and attention:
test_kernels_pointwise.py; the one-call decode step: test_kernels_layers.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qwen3vl import kernels
from qwen3vl.kernels import compiled, reference
from qwen3vl.quant import QuantLinear

BUILT = kernels.build()  # the explicit build step (cached after the first run on this CPU)
needs_ext = pytest.mark.skipif(not BUILT, reason=f"no compiled kernels: {BUILT.reason}")


def rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


def quantized(mode, n, k, group=64, seed=0, finalize=True):
    g = torch.Generator().manual_seed(seed)
    lin = QuantLinear(k, n, mode, group)
    lin.load_weight(None, torch.randn(n, k, generator=g) * 0.02)
    if finalize:  # the decode path (the stock int4 packing, without the kernels, wants N % 16 == 0)
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


def run_kernel(lin, x, impl=compiled):
    """lin's product through ``impl``: the compiled kernels or the reference."""
    if lin.mode == "int8":
        return impl.int8_gemv(x, lin.qweight, lin.scales)
    return impl.int4_gemv(x, lin.qweight, lin.scales, lin.zeros, lin.group_size)


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
        y = compiled.bf16_gemv(x, w)
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
    assert "int8_gemv" in lin.ops.compiled and lin.packed is None  # no stock int4 copy kept
    calls = []
    name = f"{mode}_gemv"
    real = getattr(lin.ops, name)
    monkeypatch.setattr(lin.ops, name, lambda *a: calls.append(1) or real(*a))
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
    monkeypatch.setattr(kernels, "select", lambda dtype, device: kernels.REFERENCE)
    lin = quantized(mode, 64, 256)
    assert not lin.ops.compiled and (mode == "int8" or lin.packed is not None)
    x = torch.randn(3, 256)
    assert rel(lin(x), x.bfloat16().double() @ lin.dequantized().double().t()) < 2e-2


def test_no_ext_env_falls_back(tmp_path):
    code = ("import torch, qwen3vl.kernels as k; r = k.build(); assert not r and not k.available(); print(r.reason);"
            "x = torch.randn(2, 64); w = torch.randn(16, 64).bfloat16(); ops = k.select(torch.bfloat16, 'cpu');"
            "assert ops is k.REFERENCE and torch.allclose(ops.bf16_gemv(x, w), x @ w.float().t(), atol=1e-4)")
    env = dict(os.environ, QWEN3VL_NO_EXT="1", QWEN3VL_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "QWEN3VL_NO_EXT=1" in out.stdout and "using stock CPU kernels (QWEN3VL_NO_EXT=1)" in out.stderr
    assert not os.listdir(tmp_path)  # nothing was built


def test_build_is_explicit_and_available_only_probes(tmp_path):
    """A fresh process: ``available()`` reports "not built" and builds nothing; ``build()`` loads
    the kernels (or says why not), is idempotent and leaves PATH as it was."""
    code = ("import os, qwen3vl.kernels as k; assert not k.available();"
            "assert k.unavailable_reason().startswith('not built'); path = os.environ.get('PATH');"
            "r = k.build(); assert k.build() == r and k.available() == r.ok and os.environ.get('PATH') == path;"
            "print(r.ok)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(bool(BUILT))


def test_ninja_from_the_wheel_is_on_path_only_while_building(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(kernels.extension, "_ninja_bin", lambda: "/wheel/bin")
    with kernels.extension._ninja_on_path():
        assert os.environ["PATH"] == "/wheel/bin" + os.pathsep + "/nonexistent"
    assert os.environ["PATH"] == "/nonexistent"


def test_select_chooses_per_op_dtype_and_device():
    """Compiled where the kernels take the dtype on the device, reference elsewhere: all ops in
    bf16, the quantized products and the vision rotary pass in fp32, nothing off the CPU."""
    assert kernels.select(torch.bfloat16, "meta") is kernels.REFERENCE and not kernels.REFERENCE.compiled
    for op in kernels.OPS:
        assert getattr(kernels.REFERENCE, op) is getattr(reference, op)
    if not BUILT:
        assert kernels.select(torch.bfloat16, "cpu") is kernels.REFERENCE
        return
    bf16, fp32 = kernels.select(torch.bfloat16, "cpu"), kernels.select(torch.float32, "cpu")
    assert bf16 is kernels.select(torch.bfloat16, torch.device("cpu")) and bf16.compiled == set(kernels.OPS)
    assert fp32.compiled == {"vision_rope", "int8_gemv", "int4_gemv", "int8_gemv_multi", "int4_gemv_multi",
                             "int8_dequant", "int4_dequant"}
    assert fp32.rms_norm is reference.rms_norm and fp32.int8_gemv is compiled.int8_gemv
    assert bf16.amx == kernels.amx()


def test_python_fallbacks_match_kernels():
    """The pure-PyTorch versions (used without the extension) compute the same products, with
    the activations exact (the int4 kernel rounds them to int8: compared as such above)."""
    lin8, lin4 = quantized("int8", 24, 96, finalize=False), quantized("int4", 24, 96, 32, finalize=False)
    x = torch.randn(3, 96)
    expected = [x.double() @ fp32_weight(lin).t() for lin in (lin8, lin4)]
    assert rel(run_kernel(lin8, x, reference), expected[0]) < 1e-5
    assert rel(run_kernel(lin4, x, reference), expected[1]) < 1e-5


def test_cpu_without_avx512_bf16_falls_back(monkeypatch):
    monkeypatch.delenv("QWEN3VL_NO_EXT", raising=False)
    monkeypatch.setattr(kernels.extension, "_cpu_flags", lambda: ("Some CPU", "fpu avx2 avx512f"))
    assert kernels.extension._check() == "CPU lacks avx512bw, avx512vl, avx512_bf16, avx512_vnni"


def test_build_dir_depends_on_cpu_and_source(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN3VL_HOME", str(tmp_path))
    build_dir = kernels.extension._build_dir
    a = build_dir(b"src", "CPU A", "avx512f avx512_bf16")
    assert a.startswith(os.path.join(str(tmp_path), "torch_extensions"))
    assert a == build_dir(b"src", "CPU A", "avx512f avx512_bf16")
    assert a != build_dir(b"src", "CPU A", "avx512f avx512_bf16 amx_tile")
    assert a != build_dir(b"src", "CPU B", "avx512f avx512_bf16")
    assert a != build_dir(b"src2", "CPU A", "avx512f avx512_bf16")


@needs_ext
def test_bf16_decoder_linears_use_the_kernel(tiny_ckpt, monkeypatch):
    """A bf16 model on CPU routes 1-4 row products of its linears (decoder and lm_head) through
    bf16_gemv, chosen at load; larger batches and fp32 models keep the stock GEMM."""
    import qwen3vl
    from qwen3vl.model.text import Linear

    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype="bfloat16")
    uses = lambda m: "linear" in m.ops.compiled  # noqa: E731
    assert uses(model.lm_head) and uses(model.model.language_model.layers[0].self_attn.qkv_proj)
    assert not any(uses(m) for m in qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt).modules() if isinstance(m, Linear))
    calls = []
    real = compiled.bf16_gemv
    monkeypatch.setattr(compiled, "bf16_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    wide = Linear(512, 96, bias=False).bfloat16()
    wide.use_ops(kernels.select(torch.bfloat16, "cpu"))
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
        run = lambda x, idx: compiled.bf16_gemv_multi(x, w, idx)  # noqa: E731
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
        compiled.bf16_gemv_multi(torch.zeros(1, 64), w, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="1 or len\\(idx\\) rows"):
        compiled.bf16_gemv_multi(torch.zeros(3, 64), w, torch.tensor([0, 1]))
