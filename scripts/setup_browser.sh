#!/usr/bin/env bash
# Install what the web-page test needs: Debian's chromium + chromium-driver (apt) and the Python
# driver package (playwright, used with the system chromium; its own browser download is never run).
# Idempotent and non-interactive: installed pieces are detected and skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

have_browser() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }

if ! have_browser; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO="sudo -n"
        else
            echo "setup_browser: chromium missing and no root/sudo to install it; the web test will skip" >&2
            exit 0
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
fi

PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import playwright" >/dev/null 2>&1; then
    "$PY" -m pip install -q playwright
fi
echo "setup_browser: $(chromium --version 2>/dev/null || echo 'chromium not found'); playwright ready"
