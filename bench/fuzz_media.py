"""Longer fuzzing of the media decoders: the harness of tests/test_fuzz_media.py (same seeds,
mutations and checks), driven by a seeded random generator for a time or example budget.

    python bench/fuzz_media.py --seconds 300            # or --examples 20000; --seed N to vary
    python bench/fuzz_media.py --seconds 60 --targets image-png video-mp4

Prints one row per target (examples, outcomes, slowest example) and, last, one JSON line. Exits 1
when an exception other than a MediaError escaped (each is printed with the mutation that made it).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from processor_fixtures import build_processor_dir  # noqa: E402
from qwen3vl.processor import Processor  # noqa: E402
from test_fuzz_media import (IMAGE_SEEDS, OPS, VIDEO_SEEDS, Unexpected, check_image, check_video,  # noqa: E402
                             fuzz_processor, mutate, seed_files)

TARGETS = [f"image-{s}" for s in IMAGE_SEEDS] + ["image-random"] + [f"video-{s}" for s in VIDEO_SEEDS] + ["video-random"]


def random_case(rng: random.Random, target: str, seeds: dict[str, bytes]) -> tuple[bytes, list]:
    """(bytes, ops) for one example: a mutated seed, or random bytes (ops empty)."""
    source = target.split("-", 1)[1]
    if source == "random":
        return rng.randbytes(rng.randint(1, 4096)), []
    ops = [(rng.choice(OPS), rng.getrandbits(32), rng.getrandbits(32)) for _ in range(rng.randint(1, 8))]
    return mutate(seeds[source], ops), ops


def run(targets: list[str], seconds: float, examples: int | None, seed: int, proc: Processor) -> dict:
    rng, seeds = random.Random(seed), seed_files()
    stats = {t: {"examples": 0, "outcomes": collections.Counter(), "slowest_s": 0.0} for t in targets}
    failures = []
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end and (examples is None or count < examples):
        target = targets[count % len(targets)]
        count += 1
        data, ops = random_case(rng, target, seeds)
        start = time.perf_counter()
        try:
            outcome = check_image(data) if target.startswith("image") else check_video(proc, data)
        except Unexpected as exc:
            outcome = "UNEXPECTED"
            failures.append({"target": target, "ops": ops, "error": str(exc).splitlines()[0],
                             "bytes": len(data)})
            print(f"UNEXPECTED in {target} ops={ops}:\n{exc}", file=sys.stderr)
        row = stats[target]
        row["examples"] += 1
        row["outcomes"][outcome] += 1
        row["slowest_s"] = max(row["slowest_s"], time.perf_counter() - start)
    return {"stats": stats, "failures": failures, "examples": count}


def print_table(result: dict) -> None:
    print(f"{'target':14s} {'examples':>8s} {'ok':>6s} {'slowest s':>9s}  errors")
    for target, row in result["stats"].items():
        errors = ", ".join(f"{k} {v}" for k, v in row["outcomes"].most_common() if k != "ok")
        print(f"{target:14s} {row['examples']:8d} {row['outcomes']['ok']:6d} {row['slowest_s']:9.3f}  {errors}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="time budget (default 120)")
    parser.add_argument("--examples", type=int, default=None, help="stop after this many examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", nargs="*", default=TARGETS, choices=TARGETS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        proc = fuzz_processor(Processor.from_pretrained(build_processor_dir(os.path.join(folder, "p"))))
        start = time.perf_counter()
        result = run(args.targets, args.seconds, args.examples, args.seed, proc)
        elapsed = time.perf_counter() - start
    print_table(result)
    summary = {"bench": "fuzz_media", "seed": args.seed, "seconds": round(elapsed, 1), "examples": result["examples"],
               "unexpected": len(result["failures"]), "failures": result["failures"][:20],
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "targets": {t: {"examples": r["examples"], **dict(r["outcomes"]), "slowest_s": round(r["slowest_s"], 3)}
                           for t, r in result["stats"].items()}}
    print(json.dumps(summary))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
