"""qwen3vl.allocator: CPU models keep freed activations in the heap (glibc), so a repeated forward
pass does not page-fault on them again; QWEN3VL_KEEP_HEAP=0 leaves malloc alone."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, torch
from qwen3vl.allocator import keep_heap
print(keep_heap())
def cycle():  # a forward pass: 6 MiB activations, a few alive at a time, all freed at the end
    live = []
    for i in range(40):
        live.append(torch.ones(6 * 2**18))
        if i % 3 == 2:
            live.pop(0)
    del live
for _ in range(3):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(env_value: str | None) -> tuple[str, int]:
    env = dict(os.environ)
    env.pop("QWEN3VL_KEEP_HEAP", None)
    if env_value is not None:
        env["QWEN3VL_KEEP_HEAP"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_keep_heap_stops_refaulting_reused_blocks():
    applied, faults = run(None)
    assert applied == "True"
    # 10 cycles touch 240 MiB each: ~60k page faults per cycle if blocks go back to the OS.
    assert faults < 2000, faults


def test_keep_heap_can_be_switched_off():
    applied, faults = run("0")
    assert applied == "False"
    if sys.platform.startswith("linux"):  # glibc's defaults give these blocks back and re-fault them
        assert faults > 20000, faults
