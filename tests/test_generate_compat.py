"""transformers-style ``generate``: padding on either side, ``generation_config``, scores and
logits of ``return_dict_in_generate``, ``stop_strings`` with ``tokenizer``, refused beam search."""
from __future__ import annotations

import pytest
import torch

import qwen3vl
from conftest import load_reference
from model_inputs import Builder, batch, mm_token_type_ids
from processor_fixtures import build_processor_dir
from qwen3vl.engine.outputs import UnsupportedGeneration
from qwen3vl.processor.tokenizer import Tokenizer

NEW = 12


def prompts():
    return [Builder(11).text(5).image(8, 12).text(6), Builder(12).text(4).video(3, 6, 8).text(5),
            Builder(13).text(17)]


def right_padded(inputs: dict) -> dict:
    """The same batch with each row's real tokens moved to the left end."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    n = mask.sum(1)
    right = torch.arange(ids.shape[1]) < n[:, None]
    moved = torch.full_like(ids, 0)
    moved[right] = ids[mask]
    return {**inputs, "input_ids": moved, "attention_mask": right.long()}


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt)


def test_left_and_right_padding_give_each_row_its_own_tokens(model):
    left = batch(*prompts())
    right = right_padded(left)
    assert not torch.equal(right["attention_mask"], left["attention_mask"])
    t = left["input_ids"].shape[1]
    out_left = model.generate(**left, max_new_tokens=NEW, do_sample=False)
    out_right = model.generate(**right, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out_right[:, :t], right["input_ids"])  # the prompt is returned as given
    assert torch.equal(out_left[:, t:], out_right[:, t:])
    for i, b in enumerate(prompts()):
        alone_inputs = batch(b)
        alone = model.generate(**alone_inputs, max_new_tokens=NEW, do_sample=False)[0, alone_inputs["input_ids"].shape[1]:]
        assert torch.equal(out_left[i, t:t + len(alone)], alone), f"row {i}"
    assert len(set(out_left[:, t:].flatten().tolist())) > 3  # varied tokens: the comparison means something


def test_scores_and_logits_match_reference(model, tiny_ckpt):
    inputs = batch(*prompts())
    ref = load_reference(tiny_ckpt)
    with torch.no_grad():
        expected = ref.generate(**inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"]), max_new_tokens=NEW,
                                do_sample=False, output_scores=True, output_logits=True, return_dict_in_generate=True,
                                repetition_penalty=1.3)
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, output_scores=True, output_logits=True,
                         return_dict_in_generate=True, repetition_penalty=1.3)
    assert torch.equal(out.sequences, expected.sequences)
    assert len(out.scores) == len(expected.scores) == NEW and len(out.logits) == NEW
    worst_scores = max(float((a - b).abs().max()) for a, b in zip(out.scores, expected.scores))
    worst_logits = max(float((a - b).abs().max()) for a, b in zip(out.logits, expected.logits))
    print(f"max |scores - reference| {worst_scores:.2e}, max |logits - reference| {worst_logits:.2e}")
    assert worst_scores <= 1e-4 and worst_logits <= 1e-4
    # The penalty changed the scores: they are the processed logits, not the raw ones.
    assert max(float((s - lg).abs().max()) for s, lg in zip(out.scores, out.logits)) > 1e-3
    only = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, repetition_penalty=1.3)
    assert only.logits is None and torch.equal(only.sequences, out.sequences)


class FakeGenerationConfig:
    """An object with attributes and ``to_dict``, as transformers' GenerationConfig."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def to_dict(self):
        return dict(self.__dict__)


@pytest.mark.parametrize("make", [dict, FakeGenerationConfig])
def test_generation_config_and_explicit_kwargs(model, make):
    inputs = batch(Builder(13).text(17))
    t = inputs["input_ids"].shape[1]
    cfg = make(max_new_tokens=5, do_sample=False, eos_token_id=[], num_beams=1)
    assert model.generate(**inputs, generation_config=cfg).shape[1] == t + 5
    assert model.generate(**inputs, generation_config=cfg, max_new_tokens=3).shape[1] == t + 3
    transformers = pytest.importorskip("transformers")
    real = transformers.GenerationConfig(max_new_tokens=4, do_sample=False)
    assert model.generate(**inputs, generation_config=real).shape[1] <= t + 4


def test_beam_search_is_refused_clearly(model):
    inputs = batch(Builder(13).text(7))
    with pytest.raises(UnsupportedGeneration, match="num_beams=4.*greedy.*sampling"):
        model.generate(**inputs, num_beams=4)
    with pytest.raises(UnsupportedGeneration, match="num_beams=2"):
        model.generate(**inputs, generation_config={"num_beams": 2})


def test_stop_strings_with_tokenizer(model, tmp_path):
    tok = Tokenizer.from_pretrained(build_processor_dir(str(tmp_path / "proc")))
    inputs = batch(Builder(13).text(17))
    t = inputs["input_ids"].shape[1]
    free = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=[])[0, t:].tolist()
    texts = [tok.decode(free[:k], skip_special_tokens=True) for k in range(1, NEW + 1)]
    k = next(k for k in range(3, NEW) if len(texts[k]) > len(texts[k - 1]) + 1)  # step k adds text
    stop = texts[k][len(texts[k - 1]) - 1:]  # spans the end of step k-1 and step k: first complete at k
    assert stop not in texts[k - 1]
    first = next(j for j in range(NEW) if stop in texts[j])
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=[], stop_strings=stop,
                         tokenizer=tok)
    assert first + 1 < NEW and out[0, t:].tolist() == free[:first + 1]
    with pytest.raises(UnsupportedGeneration, match="tokenizer"):
        model.generate(**inputs, max_new_tokens=NEW, stop_strings=stop)
