"""The package's shape, checked: no import cycle, no private name across modules, a thin CLI.

The import graph is read from the source with ``ast`` (module-level imports and imports inside
functions alike), so it is the graph a reader sees, not just what happens to be imported at run time.
Importing ``ddpm_jax.a.b`` also runs ``ddpm_jax/a/__init__.py``, so that edge is in the graph too.
docs/architecture.md draws the order these tests enforce.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ddpm_jax"
MAX_CLI_LINES = 375  # 350 until the Stable Diffusion flags of single files, LoRAs and the refiner (parsing only)
MAX_FUNCTION_LINES = 80
# Functions allowed past MAX_FUNCTION_LINES: each is one algorithm read top to bottom.
LONG_FUNCTIONS: dict[str, str] = {}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The ddpm_jax module ``name`` refers to (a module, or the module holding an imported attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, source: str | None = None) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every ddpm_jax import in ``module`` (or ``source``)."""
    tree = ast.parse(MODULES[module].read_text() if source is None else source)
    is_package = module in MODULES and MODULES[module].name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("ddpm_jax")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("ddpm_jax"):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub, None, node.lineno) if sub in MODULES else (base, alias.name, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _, _ in imports_of(module):
            target = resolve(target)
            while target:  # the module and every package __init__ above it
                if target != module:
                    edges[module].add(target)
                target = target.rpartition(".")[0] if "." in target else None
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = graph()
    edges["ddpm_jax.schedules"].add("ddpm_jax.cli")  # the paper core importing the CLI closes a loop
    assert find_cycle(edges) is not None


def test_the_graph_sees_in_function_and_relative_imports():
    source = "def f():\n    from ddpm_jax.training import loop\n    from . import samplers\n    import ddpm_jax.cli\n"
    found = {t for t, _, _ in imports_of("ddpm_jax.schedules", source)}
    assert found == {"ddpm_jax.training.loop", "ddpm_jax.samplers", "ddpm_jax.cli"}
    edges = graph()
    assert "ddpm_jax.samplers" in edges["ddpm_jax.pipelines.generate"]
    assert "ddpm_jax.pipelines" in edges["ddpm_jax.pipelines.cross_attention"]  # the package __init__ as well


def test_the_paper_core_imports_nothing_above_it():
    core = {"ddpm_jax.schedules", "ddpm_jax.diffusion", "ddpm_jax.schedulers", "ddpm_jax.samplers",
            "ddpm_jax.objectives"}
    edges = graph()
    for module in core & set(MODULES):
        assert edges[module] <= core | {"ddpm_jax"}, f"{module} imports {sorted(edges[module] - core)}"


def test_no_module_imports_another_modules_private_name():
    offenders = []
    for module in MODULES:
        tree = ast.parse(MODULES[module].read_text())
        aliases = {}  # local name -> ddpm_jax module
        for target, name, line in imports_of(module):
            if name is not None and name.startswith("_") and not name.startswith("__"):
                offenders.append(f"{module}:{line} imports {target}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddpm_jax"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("ddpm_jax") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offenders.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not offenders, "\n".join(offenders)


def test_the_cli_is_thin():
    lines = len(MODULES["ddpm_jax.cli"].read_text().splitlines())
    assert lines <= MAX_CLI_LINES, f"cli.py has {lines} lines (at most {MAX_CLI_LINES}: parsing and dispatch only)"
    imported = {resolve(t) for t, _, _ in imports_of("ddpm_jax.cli")}
    users = [m for m in MODULES if m != "ddpm_jax.cli" and "ddpm_jax.cli" in {resolve(t) for t, _, _ in imports_of(m)}]
    assert not users, f"library modules import the CLI: {users}"
    assert imported, "the CLI dispatches to library modules"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_are_short(module):
    tree = ast.parse(MODULES[module].read_text())
    long = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if ast.get_docstring(node) else node.body  # code lines, not the docstring
            length = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            qualname = f"{module}.{node.name}"
            if length > MAX_FUNCTION_LINES and qualname not in LONG_FUNCTIONS:
                long.append(f"{qualname}: {length} lines")
    assert not long, "functions longer than ~80 lines of code (split them, or list a paper algorithm in " \
                     "LONG_FUNCTIONS with its reason): " + ", ".join(long)
