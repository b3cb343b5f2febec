"""Long prompts: masked attention runs in blocks of query rows (``kernels.reference.attention``) over
masks built block by block (``cache_view.CausalMask``), so prefill memory is O(rows x context),
never O(T x context); blocked results equal the one-call ones. Block sizes are shrunk here so the
tiny checkpoint exercises the same code a 32K-token prompt takes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qwen3vl
from conftest import load_reference
from model_inputs import Builder, batch, mm_token_type_ids
from qwen3vl.engine.kv_cache import KVCache, Window
from qwen3vl.kernels import reference
from qwen3vl.model import cache_view
from qwen3vl.model.cache_view import CausalMask, Uncached, causal_mask
from qwen3vl.random_checkpoint import TINY_CONFIG
from test_model_parity import rel_err


def padded_valid(b: int, length: int, pads: list[int]) -> torch.Tensor:
    valid = torch.ones(b, length, dtype=torch.bool)
    for row, n in enumerate(pads):
        valid[row, :n] = False
    return valid


def qkv(dtype, b=2, h=4, hkv=2, t=37, length=50, d=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, n, m, d, generator=g).to(dtype) for n, m in ((h, t), (hkv, length), (hkv, length))]


def test_causal_mask_rows_equal_the_whole_mask():
    valid = padded_valid(2, 50, [0, 7])
    query = torch.arange(13, 50)[None]  # 37 new tokens after 13 cached ones
    whole = causal_mask(valid, query)
    lazy = CausalMask(valid, query)
    assert lazy.shape == tuple(whole.shape)
    for start, stop in ((0, 5), (5, 36), (36, 37)):
        assert torch.equal(lazy.rows(start, stop), whole[:, :, start:stop])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lazy", [False, True])
def test_blocked_attention_equals_one_call(monkeypatch, dtype, lazy):
    q, k, v = qkv(dtype)
    valid, query = padded_valid(2, 50, [0, 7]), torch.arange(13, 50)[None]
    whole = causal_mask(valid, query)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=whole, enable_gqa=True)
    monkeypatch.setattr(reference, "ATTENTION_BLOCK", 8 * 50)  # 8 query rows per call: 5 blocks
    got = reference.attention(q, k, v, CausalMask(valid, query) if lazy else whole)
    assert got.shape == expected.shape
    assert (got.float() - expected.float()).abs().max() <= (1e-6 if dtype == torch.float32 else 0)


def test_no_call_sees_more_than_a_block(monkeypatch):
    """A long padded prompt: the mask is lazy, and no SDPA call gets a mask (hence scores or a float
    mask) of more than ATTENTION_BLOCK elements per row of the batch."""
    t, block = 2048, 1 << 16
    monkeypatch.setattr(cache_view, "MASK_ELEMENTS", block)
    monkeypatch.setattr(reference, "ATTENTION_BLOCK", block)
    view = Uncached(padded_valid(1, t, [100]))
    assert isinstance(view.mask, CausalMask)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask.numel())
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(reference.F, "scaled_dot_product_attention", recording)
    q, k, v = qkv(torch.float32, b=1, h=2, hkv=1, t=t, length=t, d=16)
    reference.attention(q, k, v, view.mask)
    assert len(seen) == t // (block // t) and max(seen) <= block


def test_unmasked_long_prompt_stays_causal_kernel():
    """No padding, from the first token: no mask at all (SDPA's causal kernel, O(T) memory)."""
    assert Uncached(torch.ones(1, 40_000, dtype=torch.bool)).mask is None


@pytest.mark.parametrize("blocks", ["one_call", "blocked"])
def test_padded_batch_logits_match_reference_in_blocks(tiny_ckpt, monkeypatch, blocks):
    """A left-padded image/video/text batch (the masked path) through the whole model: blocked
    equals one call within 1e-6 and both equal the reference within 1e-5."""
    inputs = batch(Builder(4).text(3).image(8, 12).text(6), Builder(5).text(2).video(3, 6, 8).text(4),
                   Builder(6).text(9))
    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype=torch.float32)
    with torch.no_grad():
        whole = model(**inputs).logits
        if blocks == "blocked":
            monkeypatch.setattr(cache_view, "MASK_ELEMENTS", 64)
            monkeypatch.setattr(reference, "ATTENTION_BLOCK", 4 * inputs["input_ids"].shape[1])
            got = model(**inputs).logits
            assert rel_err(got, whole) <= 1e-6
        else:
            got = whole
        expected = load_reference(tiny_ckpt)(**inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"])).logits
    valid = inputs["attention_mask"].bool()
    assert rel_err(got[valid], expected[valid]) <= 1e-5


def test_engine_prefill_after_cached_prefix_in_blocks(monkeypatch):
    """The engine's prefill after a prefix (a Window with start > 0: always masked) in blocks
    gives the logits of the one-call mask."""
    model = qwen3vl.Qwen3VL.from_config(TINY_CONFIG, device="cpu")
    cfg = model.config.text
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(1, 40, cfg.hidden_size, generator=g)
    pos = torch.arange(40)[None, None].expand(3, 1, 40)

    def run() -> torch.Tensor:
        cache = KVCache(cfg, 1, 64, torch.float32, "cpu")
        with torch.inference_mode():
            model.step(embeds[:, :10], pos[:, :, :10], Window(cache, slice(0, 1), 0, None, 10))
            return model.step(embeds[:, 10:], pos[:, :, 10:], Window(cache, slice(0, 1), 10, None, 30))

    whole = run()
    monkeypatch.setattr(cache_view, "MASK_ELEMENTS", 64)
    monkeypatch.setattr(reference, "ATTENTION_BLOCK", 7 * 40)
    assert rel_err(run(), whole) <= 1e-6
