"""The lecture notebooks in notebooks/: each runs top to bottom in fast mode, shows every figure it draws, writes
nothing into the current folder, and none is stored with outputs.

Each notebook is executed with nbclient in a fresh temporary working directory, by an IPython kernel
started with *this* interpreter (``sys.executable``, so the project's virtual environment, whatever
``python3`` kernelspec the machine has installed), with ``DDPM_JAX_FAST=1`` (the notebooks' fast mode:
tiny model, few steps and samples; in fast mode each notebook's first cell also sets XLA's CPU backend
optimisation level 0, as this test's environment does, and XLA's older CPU fusion emitters: the notebooks'
programs are tiny and run a handful of times, so compiling them fast is what matters). A cell that raises
(including the notebooks' own ``assert`` checks) fails the test with the cell's traceback.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; a whole fast-mode notebook takes 21–44 s on 2 quiet cores, up to ~115 s at load 8 (notebooks/README.md)


# Drawing code: pyplot, imshow, a library plotting helper (plot_*), or a figure object passed to display().
DRAWS = re.compile(r"\bplt\.|\.imshow\(|\bplot_\w+\(|\bdisplay\(\s*fig")


def top_level_code(source: str) -> tuple[str, dict[str, str]]:
    """A cell's statements outside function definitions, and the source of the functions it defines."""
    source = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    body = ast.parse(source).body
    functions = {node.name: ast.get_source_segment(source, node) for node in body
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    rest = "\n".join(ast.get_source_segment(source, node) for node in body
                     if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)))
    return rest, functions


def drawing_cells(nb) -> list[int]:
    """Indices of the code cells that draw: drawing code at top level, or a call of a notebook function that draws."""
    parsed = {i: top_level_code(cell.source) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"}
    drawers = {name for _, functions in parsed.values() for name, code in functions.items() if DRAWS.search(code)}
    calls = re.compile(r"\b(" + "|".join(map(re.escape, sorted(drawers))) + r")\(") if drawers else None
    return [i for i, (rest, _) in parsed.items()
            if rest and (DRAWS.search(rest) or (calls is not None and calls.search(rest)))]


def png_count(cell) -> int:
    """How many ``image/png`` outputs an executed code cell shows."""
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def figure_problems(nb) -> list[str]:
    """What is wrong with an executed notebook's figures: a count other than ``metadata.ddpm_jax.figures``, or a
    drawing cell that shows no image (e.g. a library helper switched the kernel off the inline backend)."""
    expected = nb.metadata.get("ddpm_jax", {}).get("figures")
    if expected is None:
        return ["metadata.ddpm_jax.figures is missing: set it to the number of figures the notebook shows"]
    shown = sum(png_count(cell) for cell in nb.cells)  # a markdown cell has no outputs
    problems = [] if shown == expected else [f"{shown} image/png outputs, metadata.ddpm_jax.figures says {expected}"]
    problems += [f"cell {i} draws but shows no figure: {nb.cells[i].source.splitlines()[0][:60]!r}"
                 for i in drawing_cells(nb) if png_count(nb.cells[i]) == 0]
    return problems


def _kernel_manager(kernel_dir: pathlib.Path):
    """A KernelManager for a "python3" kernel that runs ``sys.executable -m ipykernel_launcher``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = kernel_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ddpm_jax tests)",
        "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert "01_forward_process.ipynb" in names and "02_training_and_sampling.ipynb" in names, names
    assert "03_likelihood_and_evaluation.ipynb" in names, names
    assert "04_vae.ipynb" in names, names
    assert "05_clip.ipynb" in names, names
    assert "06_conditional_and_latent_diffusion.ipynb" in names, names
    assert "07_stable_diffusion_internals.ipynb" in names, names
    assert "08_four_families.ipynb" in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel must be python3"
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} have outputs or execution counts; clear them "
                       f"(e.g. `jupyter nbconvert --clear-output --inplace {path}`)")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, tmp_path, monkeypatch):
    # The kernel inherits this environment.
    monkeypatch.setenv("DDPM_JAX_FAST", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("DDPM_JAX_RUNS", str(tmp_path / "runs"))  # what a notebook writes stays in this test's folder
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("XLA_FLAGS", " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                           "--xla_backend_optimization_level=0"])))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    nb = nbformat.read(path, as_version=4)
    km = _kernel_manager(tmp_path)
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir)}},  # the kernel's working directory
    )
    started = time.perf_counter()
    try:
        client.execute()
    finally:  # nbclient shuts down only kernels it started itself: without this each notebook's kernel (its
        km.shutdown_kernel(now=True)  # JAX threads and GBs of memory) lives until the test session ends
    seconds = time.perf_counter() - started
    print(f"{path.stem}: fast mode {seconds:.0f} s")  # reported with -s; the goal (≤ 60 s) is not a timed test
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
    problems = figure_problems(nb)
    assert not problems, f"{path.name}: " + "; ".join(problems)
    left = sorted(p.name for p in workdir.iterdir())
    assert not left, f"{path.name} wrote {left} into the current folder: write under RUNS / 'notebooks' instead"


def test_figure_check_catches_a_vanished_figure_and_a_wrong_count():
    """What the per-notebook check reports: a drawing cell without an image (the symptom of a library helper that
    switched the kernel to Agg: 04 showed 0 of its 7 figures), a count that is off, a missing declaration."""
    v4 = nbformat.v4
    png = v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    helper = v4.new_code_cell("import matplotlib.pyplot as plt\ndef show(x):\n    plt.imshow(x)\n    plt.show()")
    drawn = v4.new_code_cell("%matplotlib inline\nshow(x)", outputs=[png])
    vanished = v4.new_code_cell("fig = plot_loss_curve(path)\nplt.show()")
    silent = v4.new_code_cell("x = 1\nprint(x)")
    nb = v4.new_notebook(cells=[helper, drawn, vanished, silent], metadata={"ddpm_jax": {"figures": 2}})
    assert drawing_cells(nb) == [1, 2]
    assert figure_problems(nb) == ["1 image/png outputs, metadata.ddpm_jax.figures says 2",
                                   "cell 2 draws but shows no figure: 'fig = plot_loss_curve(path)'"]
    vanished.outputs = [png]
    assert figure_problems(nb) == []
    del nb.metadata["ddpm_jax"]
    assert "metadata.ddpm_jax.figures is missing" in figure_problems(nb)[0]
