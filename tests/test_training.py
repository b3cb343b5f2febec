"""The training / scoring forward: ``model(**batch, labels=labels).loss`` and its gradients match
the reference's on the tiny checkpoint (fused parameters mapped back through weights.name_table)."""
from __future__ import annotations

import pytest
import torch

import qwen3vl
from conftest import fused_param, load_reference
from model_inputs import Builder, batch, mm_token_type_ids
from qwen3vl.weights import name_table


def _inputs_and_labels():
    inputs = batch(Builder(1).text(5).image(8, 12).text(7), Builder(6).text(9))  # left padded, image + text
    labels = inputs["input_ids"].clone()
    mask = inputs["attention_mask"]
    # Padding, and each row's first real token (predicted from a padded position, whose logits are
    # not defined), are not scored.
    labels[(mask == 0) | (mask.cumsum(1) == 1)] = -100
    labels[inputs["input_ids"] == 1] = -100  # arbitrary extra ignored tokens
    labels[:, :3] = -100
    return inputs, labels


def _ref_grads(ref, names) -> dict[str, torch.Tensor]:
    params = dict(ref.named_parameters())
    return {n: params[n].grad for n in names if n in params}


def _our_grad(model, tgt) -> torch.Tensor:
    g = fused_param(model, tgt.param, grad=True)
    return g if tgt.rows is None else g[tgt.rows[0]:tgt.rows[1]]


def test_loss_and_gradients_match_reference(tiny_ckpt):
    inputs, labels = _inputs_and_labels()
    ref = load_reference(tiny_ckpt)
    expected = ref(**inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"]), labels=labels)
    expected.loss.backward()
    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype=torch.float32)
    out = model(**inputs, labels=labels)
    assert out.loss.requires_grad
    assert abs(float(out.loss.detach()) - float(expected.loss.detach())) <= 1e-5
    out.loss.backward()
    table = name_table(model.config)
    ref_grads = _ref_grads(ref, table)
    assert len(ref_grads) == len(table)
    worst = 0.0
    for name, tgt in table.items():
        ours, theirs = _our_grad(model, tgt), ref_grads[name]
        assert ours is not None, f"no gradient for {tgt.param}"
        scale = float(theirs.abs().max())
        if scale == 0.0:
            assert float(ours.abs().max()) <= 1e-8, name
            continue
        worst = max(worst, float((ours - theirs).abs().max()) / scale)
    print(f"worst relative gradient difference: {worst:.2e}")
    assert worst <= 1e-4


def test_loss_sum_reduction_and_logits_to_keep(tiny_ckpt):
    inputs, labels = _inputs_and_labels()
    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype=torch.float32)
    with torch.no_grad():
        mean = model(**inputs, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        summed = model(**inputs, labels=labels, num_items_in_batch=torch.tensor(2 * n)).loss
        torch.testing.assert_close(summed, mean / 2, rtol=1e-6, atol=0)
        kept = model(**inputs, labels=labels[:, -4:], logits_to_keep=4)
        assert kept.logits.shape[1] == 4
        logits = model(**inputs).logits[:, -4:]
        target = torch.nn.functional.pad(labels[:, -4:], (0, 1), value=-100)[:, 1:]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        torch.testing.assert_close(kept.loss, expected, rtol=1e-6, atol=1e-7)
        with pytest.raises(ValueError, match="labels shape"):
            model(**inputs, labels=labels, logits_to_keep=4)


def test_bfloat16_gradients_flow_and_inference_unchanged(tiny_ckpt):
    inputs, labels = _inputs_and_labels()
    model = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    with torch.inference_mode():
        before = model(**inputs).logits.float()
    loss = model(**inputs, labels=labels).loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.float().abs().sum()) for g in grads) > 0
    with torch.inference_mode():
        after = model(**inputs).logits.float()
    assert torch.equal(before, after)  # the compiled inference path is untouched by a training call
