"""Counts the bad inputs the test suite tries (the README's Reliability section quotes it; not a test file).

    python tests/_bad_inputs.py          # per test file, then the total

A bad input is one check that an input is refused with a clear error: a ``pytest.raises`` of ValueError
(and its subclasses here: CheckpointDamaged, CheckpointWriteError), FileNotFoundError or SystemExit, or an
assertion that a command exited with status 2. Each is counted once per case of the test's
``@pytest.mark.parametrize`` lists (the product of their lengths, when they are literal lists).
"""

from __future__ import annotations

import ast
import pathlib
import sys

REFUSALS = {"ValueError", "FileNotFoundError", "SystemExit", "CheckpointDamaged", "CheckpointWriteError"}


def cases(fn: ast.FunctionDef) -> int:
    n = 1
    for dec in fn.decorator_list:
        if isinstance(dec, ast.Call) and ast.unparse(dec.func).endswith("parametrize") and len(dec.args) > 1:
            values = dec.args[1]
            n *= len(values.elts) if isinstance(values, (ast.List, ast.Tuple)) else 1
    return n


def checks(fn: ast.FunctionDef) -> int:
    n = 0
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.raises" and node.args:
            n += ast.unparse(node.args[0]).split(".")[-1].strip("()") in REFUSALS
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq) for op in node.ops):
            text = ast.unparse(node)
            n += ("status == 2" in text or "returncode == 2" in text)
    return n


def count(tests: pathlib.Path) -> dict[str, int]:
    per_file = {}
    for path in sorted(tests.glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        total = sum(checks(fn) * cases(fn) for fn in ast.walk(tree)
                    if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_"))
        if total:
            per_file[path.name] = total
    return per_file


if __name__ == "__main__":
    per_file = count(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent))
    for name, n in per_file.items():
        print(f"{n:5d}  {name}")
    print(f"{sum(per_file.values()):5d}  bad inputs in {len(per_file)} test files")
