"""The lecture notebooks in notebooks/: each runs top to bottom in fast mode, and none is stored with outputs.

Each notebook is executed with nbclient in a fresh temporary working directory, by an IPython kernel
started with *this* interpreter (``sys.executable``, so the project's virtual environment, whatever
``python3`` kernelspec the machine has installed), with ``DDPM_JAX_FAST=1`` (the notebooks' fast mode:
tiny model, few steps and samples) and XLA's CPU backend optimisation turned down (the notebooks'
programs are tiny and run a handful of times, so compiling them fast is what matters). A cell that raises
(including the notebooks' own ``assert`` checks) fails the test with the cell's traceback.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; the whole fast-mode notebook takes well under a minute on 2 cores


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
    try:
        client.execute()
    finally:  # nbclient shuts down only kernels it started itself: without this each notebook's kernel (its
        km.shutdown_kernel(now=True)  # JAX threads and GBs of memory) lives until the test session ends
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
