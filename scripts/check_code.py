"""Shape rules of the code base (DESIGN.md section 6), checked by .ci/run:

* no Python function over 60 lines, no Python file over 400 lines, no C++ file over 500
  (package, tests, benchmarks, scripts);
* no function-local import of the package's own modules (such imports hide cycles from the
  layer contracts' readers); only the CLI may import lazily, for start-up speed.

Prints the offenders and exits 1 when there are any."""
from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = ("qwen3vl", "tests", "bench", "scripts")
MAX_FUNC, MAX_PY, MAX_CPP = 60, 400, 500
LAZY_IMPORTS_ALLOWED = ("qwen3vl/cli.py",)


def _size_offenders(rel: pathlib.Path, text: str, tree: ast.AST) -> list[str]:
    out = []
    n = len(text.splitlines())
    if n > MAX_PY:
        out.append(f"{rel}: {n} lines (Python file limit {MAX_PY})")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNC:
                out.append(f"{rel}:{node.lineno} {node.name}: {length} lines (function limit {MAX_FUNC})")
    return out


def _local_import_offenders(rel: pathlib.Path, tree: ast.AST) -> list[str]:
    if rel.parts[0] != "qwen3vl" or rel.as_posix() in LAZY_IMPORTS_ALLOWED:
        return []
    out = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            own = (isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("qwen3vl"))
                   or isinstance(node, ast.Import) and any(a.name.startswith("qwen3vl") for a in node.names))
            if own:
                out.append(f"{rel}:{node.lineno} {func.name}: function-local import of the package's own module")
    return out


def offenders() -> list[str]:
    out = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            rel = path.relative_to(ROOT)
            if path.suffix in (".cpp", ".h"):
                n = len(path.read_text().splitlines())
                if n > MAX_CPP:
                    out.append(f"{rel}: {n} lines (C++ limit {MAX_CPP})")
            elif path.suffix == ".py":
                text = path.read_text()
                tree = ast.parse(text)
                out += _size_offenders(rel, text, tree) + _local_import_offenders(rel, tree)
    return sorted(set(out))


if __name__ == "__main__":
    bad = offenders()
    print("\n".join(bad) if bad else "code shape: every file and function within the limits, no hidden imports")
    sys.exit(1 if bad else 0)
