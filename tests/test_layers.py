"""The import layers (pyproject ``[tool.importlinter]``) hold, and the contract really catches an
import that runs back up: the same check on a copy of the package with one back-up import fails."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint(package_parent: str) -> subprocess.CompletedProcess:
    if not os.path.exists(LINT):
        pytest.fail(f"lint-imports not installed beside {sys.executable} (test extra 'import-linter')")
    env = {**os.environ, "PYTHONPATH": package_parent}
    return subprocess.run([LINT, "--no-cache", "--config", os.path.join(ROOT, "pyproject.toml")], cwd=package_parent,
                          env=env, capture_output=True, text=True, timeout=300)


def _copy_package(tmp_path) -> str:
    shutil.copytree(os.path.join(ROOT, "qwen3vl"), tmp_path / "qwen3vl",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return str(tmp_path)


def test_layer_contracts_hold(tmp_path):
    res = _lint(_copy_package(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "BROKEN" not in res.stdout


@pytest.mark.parametrize("module, backup", [
    ("model/rope.py", "from ..engine import sampling"),  # model -> engine
    ("kernels/__init__.py", "from ..model import rope"),  # ops -> model
    ("engine/scheduler.py", "from ..server import protocol"),  # engine -> server
])
def test_a_backup_import_breaks_the_contract(tmp_path, module, backup):
    parent = _copy_package(tmp_path)
    with open(os.path.join(parent, "qwen3vl", module), "a", encoding="utf-8") as f:
        f.write(f"\n{backup}  # deliberately against the layers\n")
    res = _lint(parent)
    assert res.returncode != 0, res.stdout
    assert "BROKEN" in res.stdout and "is not allowed to import" in res.stdout
