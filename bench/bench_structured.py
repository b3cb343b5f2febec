"""Cost of grammar-constrained decoding: llguidance (ours) vs xgrammar, against the decode step.

For each schema: grammar compile time (first request; later requests copy the compiled matcher),
then the per-token cost of constraining B rows (B = 1 and 8): computing each row's token mask,
applying it to the (B, V) logits and advancing each matcher by the sampled token, while the rows
walk through a valid JSON value token by token. The decode step it is compared with is the
engine's own batched decode step of the 2B architecture (random weights, same run), so the
last column is the share of a step that constraining adds (goal: under 5 %). xgrammar is
measured on the same tokenizer and schemas when it is installed (it is not a dependency: it
needs transformers); the choice of llguidance rests on these figures and on its dependencies.

Prints a table, then ONE JSON line. Run alone: timings on a busy machine are meaningless.
Usage: python bench/bench_structured.py [--arch 2B] [--steps 48] [--batches 1,8]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import qwen3vl  # noqa: E402
from qwen3vl.bench import checkpoint, with_tokenizer  # noqa: E402
from qwen3vl.engine.constrained import Constraint, GrammarCache, advance, apply_masks  # noqa: E402

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
             "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "label": {"type": "string"}, "bbox_2d": {"type": "array", "items": {"type": "integer"},
                                                     "minItems": 4, "maxItems": 4}},
            "required": ["label", "bbox_2d"]}}}, "required": ["items"]},
}
VALUES = {"flat": {"name": "Ada Lovelace the first programmer", "age": 36},
          "nested": {"items": [{"label": f"object number {i}", "bbox_2d": [10 * i, 20, 300, 400 + i]}
                               for i in range(6)]}}


def decode_step_ms(llm, batch: int, steps: int) -> float:
    """Median wall time of one engine step decoding ``batch`` free rows."""
    params = llm.sampling_params(max_tokens=steps + 8, min_new_tokens=steps + 8, temperature=0)
    reqs = [llm.request([{"role": "user", "content": f"Count to a hundred, {i}."}], params) for i in range(batch)]
    for r in reqs:
        llm.engine.submit(r)
    while any(r.slot is None or not r.output_ids for r in reqs):
        llm.engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        llm.engine.step()
        times.append(time.perf_counter() - t)
    for r in reqs:
        llm.engine.cancel(r)
    llm.engine.run_until_done(reqs)
    return statistics.median(times) * 1e3


def ours_ms(cache: GrammarCache, schema: dict, ids: list[int], batch: int, vocab: int) -> tuple[float, float]:
    """(compile ms, median per-token ms for ``batch`` rows)."""
    constraint = Constraint.json_schema({**schema, "title": f"b{batch}"})  # a fresh cache entry
    t = time.perf_counter()
    matchers = [cache.matcher(constraint)]
    compile_ms = (time.perf_counter() - t) * 1e3
    matchers += [cache.matcher(constraint) for _ in range(batch - 1)]
    logits = torch.randn(batch, vocab)
    times = []
    for token in ids:
        t = time.perf_counter()
        apply_masks(logits, matchers)
        advance(matchers, [token] * batch)
        times.append(time.perf_counter() - t)
    return compile_ms, statistics.median(times) * 1e3


def xgrammar_ms(tokenizer, schema: dict, ids: list[int], batch: int, vocab: int, stops) -> tuple[float, float] | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    backend = json.loads(tokenizer.to_json())
    vocab_map = {**backend["model"]["vocab"], **{t["content"]: t["id"] for t in backend["added_tokens"]}}
    encoded = [""] * vocab
    for token, i in vocab_map.items():
        encoded[i] = token
    info = xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=list(stops))
    t = time.perf_counter()
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    compile_ms = (time.perf_counter() - t) * 1e3
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, vocab)
    logits = torch.randn(batch, vocab)
    times = []
    for token in ids:
        t = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        for m in matchers:
            m.accept_token(token)
        times.append(time.perf_counter() - t)
    return compile_ms, statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="2B")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtype", default="bfloat16", help="runtime dtype (the checkpoint is bf16); float32 where "
                                                        "the CPU has no fast bf16 (no AVX-512 BF16 / AMX)")
    args = ap.parse_args()
    llm = qwen3vl.LLM(with_tokenizer(checkpoint(args.arch, "bfloat16")), dtype=args.dtype)
    vocab, tok = llm.engine.vocab, llm.processor.tokenizer
    cache = GrammarCache(tok, vocab, llm.engine.stop_token_ids)
    cache.matcher(Constraint.json_object())  # the llguidance tokenizer is built once per engine (~1 s)
    rows, summary = [], {"arch": args.arch, "dtype": args.dtype, "threads": torch.get_num_threads(), "runs": []}
    for batch in map(int, args.batches.split(",")):
        step = decode_step_ms(llm, batch, args.steps)
        for name, schema in SCHEMAS.items():
            ids = tok.encode(json.dumps(VALUES[name]))
            c_ours, t_ours = ours_ms(cache, schema, ids, batch, vocab)
            xg = xgrammar_ms(tok, schema, ids, batch, vocab, llm.engine.stop_token_ids)
            run = {"batch": batch, "schema": name, "decode_step_ms": step, "llguidance_compile_ms": c_ours,
                   "llguidance_token_ms": t_ours, "llguidance_share": t_ours / step,
                   "xgrammar_compile_ms": xg and xg[0], "xgrammar_token_ms": xg and xg[1]}
            summary["runs"].append(run)
            rows.append(run)
    print(f"\nconstrained decoding, arch={args.arch}, dtype={args.dtype}, threads={summary['threads']}")
    print(f"{'batch':>5} {'schema':>7} {'step ms':>8} | {'llg compile':>11} {'llg/token':>9} {'share':>6} | "
          f"{'xgr compile':>11} {'xgr/token':>9}")
    for r in rows:
        xc = f"{r['xgrammar_compile_ms']:.2f}" if r["xgrammar_compile_ms"] is not None else "n/a"
        xt = f"{r['xgrammar_token_ms']:.3f}" if r["xgrammar_token_ms"] is not None else "n/a"
        print(f"{r['batch']:>5} {r['schema']:>7} {r['decode_step_ms']:>8.1f} | {r['llguidance_compile_ms']:>9.2f}ms "
              f"{r['llguidance_token_ms']:>7.3f}ms {100 * r['llguidance_share']:>5.1f}% | {xc:>9}ms {xt:>7}ms")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
