"""Entry point of a spawned rank: ``python -m qwen3vl.parallel.worker RANK SPEC_JSON`` (started
by ``launch.TensorParallel``; SPEC_JSON holds the world size, rendezvous port, rank 0's pid and
the ``RankArgs``)."""
from __future__ import annotations

import json
import sys

from .launch import RankArgs, spawned_rank


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    spawned_rank(int(argv[0]), spec["world"], spec["port"], RankArgs(**spec["args"]), spec["parent"])


if __name__ == "__main__":
    main(sys.argv[1:])
