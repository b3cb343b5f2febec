"""Quality of each weight format against fp32 on the tiny random checkpoint.

For bfloat16, int8 and int4 (group 32, 64; the tiny model is 64 wide), with bf16 activations (the fast setting) and,
for the quantized formats, with fp32 activations (``dtype=float32``): the prefill logits' error
relative to fp32 (max |diff| / max |fp32 logit|, over a text + image prompt), and the greedy
agreement over 64 tokens: the fp32 model generates 64 tokens greedily, then every format is fed
that same sequence (teacher forcing) and the share of positions where its argmax equals the
fp32 token is reported, plus the first position where its own free-running greedy output differs.

Random weights (normal, std 0.02) are the worst case for 4-bit scalar quantization: Gaussian
weights have no outliers to exploit and 4 bits/weight cannot beat ~6% RMS weight error (the
rate-distortion bound 2^-4). In the attention projections these 4-layer models turn that into
~16% of the max logit, which is why the int4 format keeps attention (and the lm_head) in int8
(``qwen3vl.quant``); its int4 MLPs cost little.

Prints a table, then ONE JSON line.   python bench/bench_quality.py [--tokens 64]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from qwen3vl import Qwen3VL
from qwen3vl.random_checkpoint import TINY_CONFIG, write_random_checkpoint

IMAGE_PAD, VISION_START, VISION_END, PATCH_DIM = 151655, 151652, 151653, 3 * 2 * 16 * 16


def prompt(seed: int = 0) -> dict:
    """Text, an 8x12-patch image, text: the processor's token layout, random content."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, 150000, (5,), generator=g).tolist() + [VISION_START] + [IMAGE_PAD] * 24
           + [VISION_END] + torch.randint(0, 150000, (7,), generator=g).tolist())
    ids = torch.tensor([ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(96, PATCH_DIM, generator=g), "image_grid_thw": torch.tensor([[1, 8, 12]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = write_random_checkpoint(os.path.join(tempfile.mkdtemp(), "tiny"), TINY_CONFIG, seed=1)
    inputs = prompt()
    t = inputs["input_ids"].shape[1]
    n = args.tokens
    greedy = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with torch.inference_mode():
        ref_model = Qwen3VL.from_pretrained(path)
        ref_logits = ref_model(**inputs).logits[0]  # (T, V)
        ref_ids = ref_model.generate(**inputs, **greedy)  # (1, T + n)
        forced = dict(inputs, input_ids=ref_ids, attention_mask=torch.ones_like(ref_ids))
        rows = []
        settings = [("bfloat16", None, 64)] + [(dt, q, g) for q, g in (("int8", 64), ("int4", 32), ("int4", 64))
                                               for dt in ("bfloat16", "float32")]
        for dtype, quant, group in settings:
            model = Qwen3VL.from_pretrained(path, dtype=dtype, quantization=quant, group_size=group)
            logits = model(**inputs).logits[0].float()
            err = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
            # Teacher forcing: position t-1+i predicts new token i.
            pred = model(**forced).logits[0, t - 1 : t - 1 + n].float().argmax(-1)
            agree = float((pred == ref_ids[0, t:]).float().mean())
            own = model.generate(**inputs, **greedy)[0, t:]
            diff = (own != ref_ids[0, t:]).nonzero()
            first = int(diff[0]) if len(diff) else n
            name = "bfloat16" if quant is None else f"{quant}" + (f" g{group}" if quant == "int4" else "")
            rows.append({"format": name, "activations": dtype, "logits_rel_err": round(err, 4),
                         "greedy_agreement": round(agree, 3), "first_divergence": first})
    print(f"tiny random checkpoint, {n} greedy tokens; errors relative to the fp32 model's max |logit|")
    print(f"{'format':<12} {'activations':<12} {'logits err':>11} {'agreement':>10} {'1st diff':>9}")
    for r in rows:
        print(f"{r['format']:<12} {r['activations']:<12} {r['logits_rel_err']:>11.4f} {r['greedy_agreement']:>10.3f} "
              f"{r['first_divergence']:>9}")
    print(json.dumps({"tokens": n, "results": rows}))


if __name__ == "__main__":
    main()
