"""Tests for qwen3vl.engine.sampling_params and qwen3vl.engine.sampling (stopping: test_sampling_stop.py).

Distribution tests draw many samples at once by putting the same logits in thousands of rows of one batch, then
compare empirical frequencies with the expected distribution.
"""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen3vl.engine.errors import InvalidParameter
from qwen3vl.engine.sampling import Sampler, SamplingState
from qwen3vl.engine.sampling_params import FALLBACK_STOP_TOKEN_IDS, SamplingParams, checkpoint_stop_ids

N_DRAWS = 20_000
TOL = 0.015  # about 5 standard deviations of a frequency estimated from N_DRAWS draws
# Probabilities 0.5, 0.25, 0.15, 0.1 over a 4-token vocabulary.
PROBS = torch.tensor([0.5, 0.25, 0.15, 0.1])


def frequencies(logits: torch.Tensor, params: SamplingParams, n: int = N_DRAWS) -> torch.Tensor:
    """Empirical next-token distribution of `params` on the fixed `logits` (V,)."""
    torch.manual_seed(0)
    state = SamplingState.new([params] * n, [[]] * n, vocab_size=logits.numel())
    ids = Sampler()(logits.expand(n, -1).clone(), state)
    return torch.bincount(ids, minlength=logits.numel()).float() / n


def state_for(params: SamplingParams, prompt: list[int], vocab_size: int) -> SamplingState:
    return SamplingState.new([params], [prompt], vocab_size=vocab_size)


# --- SamplingParams -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.1), ("min_p", -0.1),
    ("repetition_penalty", 0.0), ("max_new_tokens", 0), ("presence_penalty", 2.5), ("seed", "7"),
])
def test_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, InvalidParameter) and info.value.param == field


def test_invalid_parameter_in_the_callers_words():
    with pytest.raises(InvalidParameter) as info:
        SamplingParams(max_new_tokens=4, min_new_tokens=5)
    err = info.value
    assert str(err) == "SamplingParams.min_new_tokens must be an int in [0, max_new_tokens=4], got 5"
    names = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
    assert err.describe(names) == "min_tokens must be an int in [0, max_tokens=4], got 5"
    assert err.describe() == "min_new_tokens must be an int in [0, max_new_tokens=4], got 5"


def test_params_min_new_tokens_above_max():
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)


def test_params_normalisation():
    p = SamplingParams(top_k=-1, stop="END", stop_token_ids=7)
    assert (p.top_k, p.stop, p.stop_token_ids) == (0, ("END",), (7,))
    assert SamplingParams().stop_token_ids is None  # the checkpoint's, filled in by the engine
    assert SamplingParams().stop_ids == FALLBACK_STOP_TOKEN_IDS  # the last resort where nothing fills them in
    assert SamplingParams(stop_token_ids=()).stop_ids == ()
    assert SamplingParams().with_default_stops((2,)).stop_token_ids == (2,)
    assert SamplingParams(stop_token_ids=[3]).with_default_stops((2,)).stop_token_ids == (3,)
    assert SamplingParams(temperature=0).greedy and SamplingParams(do_sample=False).greedy
    assert not SamplingParams().greedy


def test_from_generation_config():
    config = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "top_k": 20,
              "top_p": 0.8, "temperature": 0.7, "repetition_penalty": 1.0, "transformers_version": "4.56.0"}
    p = SamplingParams.from_generation_config(config, top_p=0.9, seed=None, max_new_tokens=8)
    assert (p.temperature, p.top_k, p.top_p, p.max_new_tokens, p.seed) == (0.7, 20, 0.9, 8, None)
    assert p.stop_token_ids == (151645, 151643) and p.do_sample
    assert SamplingParams.from_generation_config({"eos_token_id": 2}).stop_token_ids == (2,)
    assert SamplingParams.from_generation_config({}).stop_token_ids is None
    assert SamplingParams.from_generation_config(config, do_sample=False).greedy
    with pytest.raises(TypeError, match="max_tokens.*topk"):
        SamplingParams.from_generation_config(config, topk=3, max_tokens=5)


def test_checkpoint_stop_ids_first_that_names_one():
    assert checkpoint_stop_ids([151645, 151643], 151645, 7) == (151645, 151643)
    assert checkpoint_stop_ids(None, 5, 7) == (5,)
    assert checkpoint_stop_ids(None, None, 7) == (7,)
    assert checkpoint_stop_ids(None, [], None) == FALLBACK_STOP_TOKEN_IDS


# --- individual sampling parameters ---------------------------------------------------------------------------


def test_greedy_is_argmax_with_first_index_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 0.0]])
    params = [SamplingParams(do_sample=False), SamplingParams(temperature=0.0)]
    state = SamplingState.new(params, [[], []], vocab_size=4)
    assert Sampler()(logits, state).tolist() == [1, 0]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sharpens_and_flattens(temperature):
    logits = PROBS.log()
    freq = frequencies(logits, SamplingParams(temperature=temperature))
    expected = (logits / temperature).softmax(-1)
    assert torch.allclose(freq, expected, atol=TOL)


def test_temperature_ordering_of_top_token():
    logits = PROBS.log()
    top = [frequencies(logits, SamplingParams(temperature=t))[0].item() for t in (0.3, 1.0, 3.0)]
    assert top[0] > 0.8 and top[0] > top[1] > top[2] and top[2] < 0.35


def test_top_k_restricts_support():
    freq = frequencies(PROBS.log(), SamplingParams(top_k=2))
    assert freq[2:].sum() == 0
    assert torch.allclose(freq[:2], torch.tensor([2 / 3, 1 / 3]), atol=TOL)


@pytest.mark.parametrize("top_p, support", [(0.6, 2), (0.8, 3), (0.3, 1), (1.0, 4)])
def test_top_p_support(top_p, support):
    # Smallest set of most likely tokens reaching top_p: 0.5 | 0.75 | 0.9 | 1.0 cumulative.
    freq = frequencies(PROBS.log(), SamplingParams(top_p=top_p))
    assert (freq > 0).sum() == support and freq[support:].sum() == 0
    assert torch.allclose(freq[:support], PROBS[:support] / PROBS[:support].sum(), atol=TOL)


def test_min_p_relative_to_top_token():
    # Threshold 0.4 * 0.5 = 0.2 keeps tokens 0 and 1 only.
    freq = frequencies(PROBS.log(), SamplingParams(min_p=0.4))
    assert freq[2:].sum() == 0
    assert torch.allclose(freq[:2], torch.tensor([2 / 3, 1 / 3]), atol=TOL)


def test_min_p_is_applied_after_temperature():
    # At temperature 2 the probabilities flatten to ~0.38, 0.27, 0.21, 0.17: min_p 0.5 now keeps three tokens.
    freq = frequencies(PROBS.log(), SamplingParams(min_p=0.5, temperature=2.0))
    assert (freq > 0).tolist() == [True, True, True, False]


def test_repetition_penalty_matches_hf():
    torch.manual_seed(1)
    vocab, prompt, generated = 50, [3, 7, 7, 11, 49], [2, 11, 30]
    logits = torch.randn(1, vocab) * 3
    state = state_for(SamplingParams(repetition_penalty=1.3, do_sample=False), prompt, vocab)
    for token in generated:
        state.advance(torch.tensor([token]))
    ours = Sampler.process_logits(logits, state)
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + generated]), logits.clone())
    assert torch.equal(ours, hf)
    assert not torch.equal(ours, logits)


def test_presence_and_frequency_penalty_arithmetic():
    vocab = 6
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0, 0.0]])
    params = SamplingParams(presence_penalty=1.5, frequency_penalty=0.25, do_sample=False)
    state = state_for(params, [0, 5], vocab)  # prompt tokens must not be penalised
    for token in [1, 1, 1, 2]:
        state.advance(torch.tensor([token]))
    expected = logits.clone()
    expected[0, 1] -= 1.5 + 3 * 0.25
    expected[0, 2] -= 1.5 + 1 * 0.25
    assert torch.allclose(Sampler.process_logits(logits, state), expected)


def test_penalties_are_updated_by_sampling_and_change_greedy_choice():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    state = state_for(SamplingParams(do_sample=False, frequency_penalty=0.6), [], 3)
    sampler = Sampler()
    # 2.0 -> 1.4 after one pick, 0.8 after two: token 1 (1.0) wins the third step.
    assert [sampler(logits, state).item() for _ in range(3)] == [0, 0, 1]


def test_min_new_tokens_blocks_all_stop_ids():
    vocab = 8
    logits = torch.full((1, vocab), -5.0)
    logits[0, 6], logits[0, 7], logits[0, 2] = 10.0, 9.0, 1.0  # both stop ids far more likely than anything else
    params = SamplingParams(do_sample=False, min_new_tokens=3, stop_token_ids=[6, 7])
    state = state_for(params, [1, 2], vocab)
    ids = [Sampler()(logits, state).item() for _ in range(4)]
    assert ids == [2, 2, 2, 6]


def test_scratch_logits_are_masked_in_place_with_the_same_result():
    """generate() hands the sampler its own logits buffer (scratch=True): same ids, no copy."""
    vocab = 8
    logits = torch.full((1, vocab), -5.0)
    logits[0, 6], logits[0, 2] = 10.0, 1.0
    params = SamplingParams(do_sample=False, min_new_tokens=2, stop_token_ids=[6])
    kept, scratch = logits.clone(), logits.clone()
    assert Sampler()(kept, state_for(params, [1], vocab)).item() == 2 and torch.equal(kept, logits)
    assert Sampler()(scratch, state_for(params, [1], vocab), scratch=True).item() == 2
    assert scratch[0, 6] == float("-inf")  # masked where it lay


def test_min_new_tokens_blocks_eos_when_sampling():
    logits = torch.tensor([2.0, 0.0, 0.0, 5.0])
    freq = frequencies(logits, SamplingParams(min_new_tokens=1, stop_token_ids=[3]))
    assert freq[3] == 0 and freq[0] > 0.7


# --- reproducibility and batching -----------------------------------------------------------------------------


def run_steps(state: SamplingState, logits: torch.Tensor, steps: int) -> torch.Tensor:
    sampler = Sampler()
    return torch.stack([sampler(logits, state) for _ in range(steps)], dim=1)  # (B, steps)


def test_seed_reproducibility():
    torch.manual_seed(2)
    logits = torch.randn(1, 1000)
    seqs = {}
    for name, seed in [("a", 1234), ("b", 1234), ("c", 99)]:
        torch.manual_seed(hash(name) % 1000)  # the global generator must not matter for seeded rows
        state = state_for(SamplingParams(seed=seed, presence_penalty=0.5), [0], 1000)
        seqs[name] = run_steps(state, logits, 20)
    assert torch.equal(seqs["a"], seqs["b"])
    assert not torch.equal(seqs["a"], seqs["c"])


def test_seeded_row_independent_of_batch_neighbours():
    torch.manual_seed(3)
    vocab = 500
    logits = torch.randn(3, vocab)
    seeded = SamplingParams(seed=7, top_k=50, temperature=0.8)
    alone = run_steps(state_for(seeded, [1, 2], vocab), logits[1:2], 10)[0]
    params = [SamplingParams(top_p=0.5), seeded, SamplingParams(do_sample=False)]
    together = run_steps(SamplingState.new(params, [[5], [1, 2], [9]], vocab), logits, 10)
    assert torch.equal(together[1], alone)


def test_greedy_row_next_to_sampled_row():
    torch.manual_seed(4)
    vocab = 20
    row = torch.randn(vocab)
    n = 400
    params = [SamplingParams(do_sample=False) if i % 2 == 0 else SamplingParams(temperature=1.5) for i in range(n)]
    state = SamplingState.new(params, [[]] * n, vocab)
    ids = Sampler()(row.expand(n, -1).clone(), state)
    assert (ids[0::2] == row.argmax()).all()
    assert ids[1::2].unique().numel() > 5  # sampled rows really sample


def test_select_and_concat_carry_counts_and_generators():
    torch.manual_seed(5)
    vocab = 300
    logits = torch.randn(2, vocab)
    params = [SamplingParams(seed=11, repetition_penalty=1.5), SamplingParams(seed=12, frequency_penalty=1.0)]
    prompts = [[1, 2, 3], [4]]
    reference = run_steps(SamplingState.new(params, prompts, vocab), logits, 8)

    state = SamplingState.new(params, prompts, vocab)
    first = run_steps(state, logits, 4)
    # Composition changes: row 1 leaves, a greedy row joins, then row 1 comes back in front.
    row0 = SamplingState.concat([state.select([0]), state_for(SamplingParams(do_sample=False), [8], vocab)])
    row1 = state.select([1])
    merged = SamplingState.concat([row1, row0.select([0])])
    assert merged.num_generated.tolist() == [4, 4]
    rest = run_steps(merged, logits.flip(0), 4).flip(0)
    assert torch.equal(torch.cat([first, rest], dim=1), reference)


def test_sampler_leaves_input_logits_untouched():
    logits = torch.randn(2, 10)
    before = logits.clone()
    state = SamplingState.new([SamplingParams(top_k=3), SamplingParams(do_sample=False)], [[], []], 10)
    Sampler()(logits, state)
    Sampler.process_logits(logits, state)
    assert torch.equal(logits, before)


# --- equivalence with transformers' warper chain --------------------------------------------------------------


def hf_chain(p: SamplingParams) -> LogitsProcessorList:
    """The warpers transformers' generate builds for `p` with do_sample=True."""
    chain = LogitsProcessorList()
    if p.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(float(p.temperature)))
    if p.top_k:
        chain.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        chain.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        chain.append(MinPLogitsWarper(p.min_p))
    return chain


def test_warper_chain_matches_transformers():
    torch.manual_seed(6)
    vocab = 2000
    params = [
        SamplingParams(temperature=0.7, top_k=20, top_p=0.8),  # Qwen3-VL instruct defaults
        SamplingParams(temperature=1.0, top_p=0.95),
        SamplingParams(temperature=0.6, top_k=50, top_p=0.9, min_p=0.05),
        SamplingParams(top_k=1),
        SamplingParams(temperature=1.3, min_p=0.1),
        SamplingParams(temperature=0.9, top_k=0, top_p=0.5),
        SamplingParams(),
        SamplingParams(top_k=vocab + 10, top_p=0.99, min_p=0.2),
    ]
    logits = torch.randn(len(params), vocab) * 4
    logits[:, :3] = logits[:, 3:6]  # ties around the cut-offs
    state = SamplingState.new(params, [[]] * len(params), vocab)
    ours = Sampler.process_logits(logits, state)
    for row, p in enumerate(params):
        hf = hf_chain(p)(torch.zeros(1, 1, dtype=torch.long), logits[row:row + 1].clone())
        assert torch.equal(ours[row:row + 1], hf), f"row {row}: {p}"


def test_fast_argmax_matches_torch_argmax_including_ties():
    from qwen3vl.engine.sampling import fast_argmax

    g = torch.Generator().manual_seed(0)
    for v in (151936, 1000, 7):
        x = torch.randn(5, v, generator=g)
        x[1, :] = 0.0  # all tied: first index
        x[2, v // 2] = x[2, v - 1] = 100.0  # tie across blocks: the earlier one
        assert torch.equal(fast_argmax(x), x.argmax(-1))


def test_topk_candidate_path_equals_full_sort_path(monkeypatch):
    import qwen3vl.engine.sampling as sampling

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5000, generator=g) * 3
    top_k = torch.tensor([1, 20, 50, 400])
    cut = torch.tensor([0.2, -1.0, 0.5, 0.05])
    fast = sampling._top_k_top_p(logits, top_k, cut)
    monkeypatch.setattr(sampling, "_TOPK_FAST_MAX", 0)
    full = sampling._top_k_top_p(logits, top_k, cut)
    assert torch.equal(torch.isinf(fast), torch.isinf(full))
    torch.testing.assert_close(fast[~torch.isinf(full)], full[~torch.isinf(full)])
