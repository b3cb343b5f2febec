"""The one-call decode step (kernels.decode_layers): bit-identical to the module path in every
weight format and cache layout, argument checks, and where it applies."""
from __future__ import annotations

import pytest
import torch

from qwen3vl import kernels
from qwen3vl.engine.kv_cache import KVCache, Scatter, Window
from test_kernels import needs_ext


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
            outs.append(dec(x, AttnContext(cos, sin, win)))
        for i in range(3):
            b = len(prefills)
            x = torch.randn(b, 1, cfg.hidden_size, generator=g).bfloat16()
            pos = torch.tensor([t + i for _, t, _ in prefills]).view(1, b, 1).expand(3, b, 1)
            cos, sin = model.rope(pos, torch.bfloat16)
            win = window(cache, i)
            outs.append(dec(x, AttnContext(cos, sin, win)))
    return outs, cache.k.clone(), cache.v.clone()


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory) -> str:
    """The tiny checkpoint in bf16: a bf16 load maps it whole, q/k/v and gate/up split (SplitLinear)."""
    from conftest import tiny_config
    from qwen3vl.random_checkpoint import write_random_checkpoint

    cfg = tiny_config()
    cfg["torch_dtype"] = "bfloat16"
    return write_random_checkpoint(str(tmp_path_factory.mktemp("bf16")), cfg, seed=1, dtype=torch.bfloat16)


@needs_ext
@pytest.mark.parametrize("quant", [None, "int8", "int4", "split"])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_layers_are_bit_identical_to_the_module_path(request, quant, case, monkeypatch):
    """Decode runs the dense layers in one compiled call (kernels.decode_layers) in every weight
    format (split: bf16 q/k/v and gate/up as separate parts), for the whole stack or (in a model
    mixing in MoE layers) per layer, for one sequence or several (lock-step with padding masks, or
    at different lengths): same kernels, same order, so hidden states and the KV cache match the
    module path bit for bit."""
    import qwen3vl
    from qwen3vl.model.split_linear import SplitLinear

    path = request.getfixturevalue("bf16_ckpt" if quant == "split" else "tiny_ckpt")
    model = qwen3vl.Qwen3VL.from_pretrained(path, dtype="bfloat16", quantization=None if quant == "split" else quant,
                                            group_size=32)
    assert isinstance(model.model.language_model.layers[0].mlp.gate_up_proj, SplitLinear) == (quant == "split")
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
@pytest.mark.parametrize("case", ["window", "scatter2"])
def test_split_projections_decode_like_the_fused_ones(bf16_ckpt, case):
    """The same bf16 checkpoint mapped (q/k/v and gate/up split into parts) and copied (fused), through
    prefill and the one-call decode step: the same hidden states and KV cache. Bit-identical on the
    CPUs measured; asserted within bf16 rounding, as the prefill GEMM library may block a narrower
    matrix differently (a wrong part order or offset would be off by O(1))."""
    import qwen3vl

    split = qwen3vl.Qwen3VL.from_pretrained(bf16_ckpt, dtype="bfloat16")
    fused = qwen3vl.Qwen3VL.from_pretrained(bf16_ckpt, dtype="bfloat16", weight_cache=False)
    for path in ("stack", "modules"):
        a, b = _decode_run(split, path, case), _decode_run(fused, path, case)
        for x, y in list(zip(a[0], b[0])) + [(a[1], b[1]), (a[2], b[2])]:
            x, y = x.float(), y.float()
            assert float((x - y).abs().max()) <= 2e-2 * float(y.abs().max()), path


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
                dec(torch.randn(b, 1, cfg.hidden_size).bfloat16(), AttnContext(cos, sin, win))
    finally:
        kernels.decode_layers = real
    assert calls == [1]  # 2 rows in one call, 3 rows module by module
    assert qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt).model.language_model.layers[0]._step is None  # fp32
    model.float()
    dec = model.model.language_model
    assert dec._steps is None and all(layer._step is None for layer in dec.layers)
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False).shape == (1, 5)
