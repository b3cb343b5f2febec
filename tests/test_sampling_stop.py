"""Tests for qwen3vl.engine.stopping: stop strings and ids, budgets, and the sampler and stop checker together."""
from __future__ import annotations

import pytest
import torch

from qwen3vl.engine.sampling import Sampler, SamplingState
from qwen3vl.engine.sampling_params import SamplingParams
from qwen3vl.engine.stopping import StopChecker, StopResult


# --- stopping ---------------------------------------------------------------------------------------------------


def feed(checker: StopChecker, tokens: list[tuple[int, str]]) -> list[StopResult]:
    results = []
    for token_id, delta in tokens:
        results.append(checker.update(token_id, delta))
        if results[-1].finished:
            break
    return results


def test_stop_string_spanning_tokens_is_excluded():
    checker = StopChecker(SamplingParams(stop=["###", "STOP"]))
    results = feed(checker, [(1, "Hello S"), (2, "T"), (3, "O"), (4, "P now"), (5, "never")])
    assert [r.text for r in results] == ["Hello ", "", "", ""]
    assert results[-1] == StopResult("", True, "stop")
    assert checker.text == "Hello " and checker.finish_reason == "stop"


def test_partial_stop_string_is_held_then_released():
    checker = StopChecker(SamplingParams(stop=["</answer>"]))
    results = feed(checker, [(1, "a </an"), (2, "swer"), (3, "x> b"), (4, " c</answer>tail")])
    assert [r.text for r in results] == ["a ", "", "</answerx> b", " c"]
    assert results[-1].finish_reason == "stop" and checker.text == "a </answerx> b c"


def test_earliest_stop_string_wins():
    checker = StopChecker(SamplingParams(stop=["world", "lo w"]))
    assert checker.update(1, "hello world") == StopResult("hel", True, "stop")


def test_stop_token_id_releases_held_text():
    checker = StopChecker(SamplingParams(stop=["STOP"], stop_token_ids=[9]))
    results = feed(checker, [(1, "abc ST"), (9, "<|im_end|>")])
    assert [r.text for r in results] == ["abc ", "ST"]
    assert results[-1].finish_reason == "stop" and checker.text == "abc ST"


def test_default_stop_ids_end_the_sequence():
    checker = StopChecker(SamplingParams())
    assert checker.update(100, "hi") == StopResult("hi", False, None)
    assert checker.update(151643, "") == StopResult("", True, "stop")
    with pytest.raises(RuntimeError):
        checker.update(5, "x")


def test_length_finish_flushes_held_text():
    checker = StopChecker(SamplingParams(max_new_tokens=3, stop=["STOP"]))
    results = feed(checker, [(1, "a"), (2, "b"), (3, "ST"), (4, "OP")])
    assert [r.text for r in results] == ["a", "b", "ST"]
    assert results[-1] == StopResult("ST", True, "length") and checker.num_tokens == 3


def test_stop_on_last_allowed_token_reports_stop():
    checker = StopChecker(SamplingParams(max_new_tokens=2, stop_token_ids=[0]))
    assert feed(checker, [(5, "x"), (0, "")])[-1].finish_reason == "stop"


def test_min_new_tokens_in_stop_checker():
    checker = StopChecker(SamplingParams(min_new_tokens=3, stop_token_ids=[0], stop=["!"]))
    results = feed(checker, [(0, "<eos>"), (1, "!"), (2, "a!"), (3, "b")])
    assert [r.finished for r in results] == [False, False, True]
    assert checker.text == "<eos>!a" and checker.finish_reason == "stop"


def test_sampler_and_stop_checker_together():
    # How a generation loop wires the two together: sample, then feed each row's token to its checker.
    vocab = 16
    torch.manual_seed(7)
    logits = torch.randn(2, vocab)
    logits[:, 0] = 20.0  # token 0 is the stop id and dominates once allowed
    params = [SamplingParams(seed=3, min_new_tokens=2, stop_token_ids=[0], max_new_tokens=10),
              SamplingParams(do_sample=False, stop_token_ids=[0], max_new_tokens=10, min_new_tokens=4)]
    state = SamplingState.new(params, [[1], [2]], vocab)
    checkers = [StopChecker(p) for p in params]
    sampler = Sampler()
    while not all(c.finished for c in checkers):
        ids = sampler(logits, state)
        for checker, token in zip(checkers, ids.tolist()):
            if not checker.finished:
                checker.update(token, "" if token == 0 else f"<{token}>")
    assert [c.num_tokens for c in checkers] == [3, 5]
    assert all(c.finish_reason == "stop" for c in checkers)
