"""Progress bars that read well in a terminal and in Jupyter: one function, ``progress_bar``.

Every loop of the library that reports progress (training steps, sampling chunks, bits/dim batches, the
judge's training, guidance sweeps, Inception batches, Stable Diffusion's denoising steps) makes its bar
here, so that all of them behave the same way:

* in a terminal: tqdm's text bar on stderr, as ``tqdm.tqdm`` draws it;
* in a Jupyter kernel with ``ipywidgets`` installed: tqdm's widget bar (``tqdm.notebook``);
* in a Jupyter kernel without ``ipywidgets``: the text bar on **stdout**, redrawn at most once a second.
  Jupyter rewrites the line in place (``\\r``), so a cell shows one plain line instead of a red stderr
  block, and there is no "IProgress not found" warning (what ``tqdm.auto`` prints without the widgets).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import tqdm

__all__ = ["in_jupyter_kernel", "progress_bar"]


def in_jupyter_kernel() -> bool:
    """True when this code runs inside a Jupyter (IPython ZMQ) kernel, e.g. a notebook cell."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm.tqdm:
    """A tqdm bar over ``iterable`` (or of ``total=``); any tqdm keyword (``desc``, ``unit``, ``disable``…)."""
    if in_jupyter_kernel():
        kwargs.pop("dynamic_ncols", None)  # a notebook has no terminal width to follow
        if importlib.util.find_spec("ipywidgets") is not None:
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm(iterable, **kwargs)
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("mininterval", 1.0)
        kwargs.setdefault("ncols", 100)
    return tqdm.tqdm(iterable, **kwargs)
