#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch and qwen3vl (editable) plus its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
# Pinned: an unpinned torch would pull several GB of CUDA packages.
pip install -q "torch==2.13.0"
# Test-only: the reference's video processor needs torchvision; --no-deps keeps the CPU torch (its
# CUDA-only operator registrations are stubbed in the tests, tests/processor_fixtures.py).
pip install -q --no-deps "torchvision==0.28.0"
pip install -q -e ".[test,hub]"
# Headless Chromium for the web page test (Debian packages; the test skips, saying why, without it).
bash scripts/setup_browser.sh || echo "setup: browser setup failed; the web page test will skip" >&2
