"""ddpm_jax.progress.progress_bar: tqdm's text bar in a terminal; in a Jupyter kernel without ipywidgets a
plain stdout line (no red stderr block, no "IProgress not found" warning); tqdm.notebook with ipywidgets."""

from __future__ import annotations

import importlib.util
import io
import warnings

import IPython
import pytest
import tqdm

from ddpm_jax import progress


class ZMQInteractiveShell:  # what IPython.get_ipython() returns inside a Jupyter kernel (by class name)
    pass


def test_outside_a_kernel_it_is_the_terminal_text_bar(monkeypatch):
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    assert not progress.in_jupyter_kernel()
    stream = io.StringIO()
    with progress.progress_bar(range(3), desc="steps", file=stream, dynamic_ncols=True) as bar:
        assert list(bar) == [0, 1, 2]
    assert type(bar) is tqdm.tqdm and "steps: 100%" in stream.getvalue()


def test_in_a_kernel_without_widgets_it_writes_one_stdout_line_and_no_warning(monkeypatch, capsys):
    monkeypatch.setattr(IPython, "get_ipython", lambda: ZMQInteractiveShell())
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ipywidgets" else real_find_spec(name, *a))
    assert progress.in_jupyter_kernel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm.auto would warn "IProgress not found" here
        bar = progress.progress_bar(total=4, desc="sampling", unit="batch", dynamic_ncols=True)
        bar.update(4)
        bar.close()
    out, err = capsys.readouterr()
    assert type(bar) is tqdm.tqdm and "sampling: 100%" in out and "4/4" in out and err == ""


@pytest.mark.skipif(importlib.util.find_spec("ipywidgets") is None, reason="ipywidgets is not installed")
def test_in_a_kernel_with_widgets_it_is_the_notebook_bar(monkeypatch):
    from tqdm.notebook import tqdm as notebook_tqdm

    monkeypatch.setattr(IPython, "get_ipython", lambda: ZMQInteractiveShell())
    bar = progress.progress_bar(total=2, disable=True)
    assert isinstance(bar, notebook_tqdm)
