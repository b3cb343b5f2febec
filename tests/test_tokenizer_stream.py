"""Streaming detokenisation: deltas never split a UTF-8 character and add up to the full decode."""
from __future__ import annotations

import numpy as np

from processor_fixtures import processor, processor_dir  # noqa: F401
from qwen3vl.processor import IncrementalDetokenizer

TEXT = "Hello 世界! 🙂🚀 Ünïcödé — ok\n<think>思考</think> done 👨‍👩‍👧 ∑x² ✓"


def stream(tok, ids, skip=True):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas, detok


def test_deltas_concatenate_and_never_split_chars(processor):
    tok = processor.tokenizer
    ids = tok.encode(TEXT) + [151645]
    # emoji and CJK characters span several byte-level tokens: some steps must hold bytes back
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for skip in (True, False):
        deltas, detok = stream(tok, ids, skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip) == detok.text
        assert all("\ufffd" not in d for d in deltas)


def test_random_ids_and_chunks(processor):
    tok = processor.tokenizer
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 151643, 300).tolist() + tok.encode("末尾🙂")
    detok = IncrementalDetokenizer(tok)
    out, pos = [], 0
    while pos < len(ids):  # chunks of 1..5 tokens, as a speculative/batched decoder would hand over
        n = int(rng.integers(1, 6))
        out.append(detok.add(ids[pos:pos + n]))
        pos += n
    out.append(detok.flush())
    assert "".join(out) == tok.decode(ids, skip_special_tokens=True)
