"""Issue 19, item 4: everything the library imports is declared in setup.cfg.

Every third-party top-level module imported anywhere in ``ddpm_jax/`` (found with ``ast``: module level and
inside functions) must come from a distribution in ``install_requires``, or, when the import is optional
(inside ``try: … except ImportError``), from one listed in an extra. ``scipy`` came only through mlxtend and
``ml_dtypes`` only through jax before this was checked. Every pin added for the extras is in
requirements/constraints.txt, and ``make notebooks`` installs the notebooks extra and starts JupyterLab.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Import name → distribution, for modules not installed here (packages_distributions() only knows installed ones).
KNOWN = {"PIL": "pillow", "orbax": "orbax-checkpoint", "tensorflow_datasets": "tensorflow-datasets",
         "ml_collections": "ml-collections", "ml_dtypes": "ml-dtypes", "huggingface_hub": "huggingface-hub"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(lines: str) -> set[str]:
    return {canonical(re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0])
            for line in lines.splitlines() if line.strip() and not line.strip().startswith("#")}


def guarded(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``try:`` blocks that catch ImportError / ModuleNotFoundError."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            ids |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return ids


def library_imports() -> dict[str, dict[str, bool]]:
    """{third-party top-level module: {file: whether every import of it there is optional}}."""
    found: dict[str, dict[str, bool]] = {}
    for path in sorted((REPO / "ddpm_jax").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        optional = guarded(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "ddpm_jax":
                    continue
                where = found.setdefault(top, {})
                rel = str(path.relative_to(REPO))
                where[rel] = where.get(rel, True) and id(node) in optional
    return found


def distribution(module: str, installed: dict[str, list[str]]) -> str:
    return canonical((installed.get(module) or [KNOWN.get(module, module)])[0])


@pytest.fixture(scope="module")
def setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    required = requirement_names(cfg["options"]["install_requires"])
    extras = {name: requirement_names(value) for name, value in cfg["options.extras_require"].items()}
    return required, extras


def test_every_library_import_is_declared(setup_cfg):
    required, extras = setup_cfg
    in_extras = set().union(*extras.values())
    imports = library_imports()
    assert {"jax", "scipy", "ml_dtypes", "huggingface_hub"} <= set(imports)    # the scan sees them
    installed = importlib.metadata.packages_distributions()     # {module: [distribution, ...]}, one scan
    undeclared = []
    for module, files in sorted(imports.items()):
        dist = distribution(module, installed)
        optional = all(files.values())
        if dist not in required and not (optional and dist in in_extras):
            kind = "an optional import (try/except ImportError) missing from every extra" if optional else \
                "missing from install_requires"
            undeclared.append(f"{module} (distribution {dist}, imported in {', '.join(files)}): {kind}")
    assert not undeclared, "setup.cfg does not declare:\n" + "\n".join(undeclared)


def test_extras_hub_and_notebooks_are_pinned_in_the_constraints(setup_cfg):
    _, extras = setup_cfg
    assert extras["hub"] == {"huggingface-hub"}
    assert extras["notebooks"] == {"jupyterlab", "ipywidgets"}
    pinned = requirement_names((REPO / "requirements" / "constraints.txt").read_text())
    assert {"scipy", "ml-dtypes", "huggingface-hub", "jupyterlab", "ipywidgets"} <= pinned


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_notebooks_installs_the_extra_and_opens_jupyterlab(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # also under `make test`
    out = subprocess.run(["make", "--no-print-directory", "-n", "-W", ".venv/.base", "notebooks"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)   # -n: print the commands only, run nothing
    assert out.returncode == 0, out.stderr
    assert "-e '.[notebooks]'" in out.stdout and "-c requirements/constraints.txt" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == ".venv/bin/jupyter lab notebooks/"
