"""qwen3vl.allocator: CPU models keep freed activations in the heap (glibc), so a repeated forward
pass does not page-fault on them again (QWEN3VL_KEEP_HEAP=0 leaves malloc alone), and large
weights are advised onto transparent huge pages (QWEN3VL_HUGE_PAGES=0: not)."""
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


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


HUGE_SCRIPT = r"""
import torch
from qwen3vl.allocator import advise_huge_pages
t = torch.empty(64 * 2**20, dtype=torch.uint8)  # untouched: pages come on first write
small = torch.empty(2**20, dtype=torch.uint8)
print(advise_huge_pages([t, small]))
t.fill_(1)
start, end = t.data_ptr(), t.data_ptr() + t.numel()
huge, inside = 0, False
with open("/proc/self/smaps") as f:
    for line in f:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo < end and hi > start
        elif inside and head == "AnonHugePages:":
            huge += int(line.split()[1]) * 1024
print(huge)
"""


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="no transparent huge pages")
def test_weights_get_huge_pages():
    """The 2 MiB-aligned interior of a large tensor is advised (small ones are left alone) and,
    once written, backed by huge pages."""
    env = dict(os.environ)
    env.pop("QWEN3VL_HUGE_PAGES", None)
    out = subprocess.run([sys.executable, "-c", HUGE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    advised, huge = (int(v) for v in out.stdout.split())
    assert 62 * 2**20 <= advised <= 64 * 2**20
    assert huge >= 32 * 2**20  # most of it (the kernel may fall back to 4 KiB pages under pressure)
    env["QWEN3VL_HUGE_PAGES"] = "0"
    out = subprocess.run([sys.executable, "-c", HUGE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[0] == "0"
