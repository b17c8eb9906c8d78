"""A pytest plugin (loaded by tests/conftest.py): under ``CI=true`` a test skipped because a *reference* library
failed to import fails instead, so a broken install of torch, diffusers, … cannot turn the parity tests into a
green run of skips. Other skips (a missing optional widget library, a GPU-only case) stay skips.

``pytest.importorskip("diffusers")`` skips with the reason ``could not import 'diffusers': …``; that reason,
for a module whose top-level package is in REFERENCE_LIBRARIES, is what turns into a failure, in collection
(module-level ``importorskip``) and in a test's setup or call alike. Not a test file.
"""

from __future__ import annotations

import os
import re

import pytest

# The test extra of setup.cfg (and what ships with it): the oracles the parity tests compare against.
REFERENCE_LIBRARIES = frozenset({
    "torch", "torchvision", "pytorch_fid", "scipy", "diffusers", "transformers", "huggingface_hub", "regex",
    "tensorflow_datasets", "nbclient", "nbformat", "ipykernel",
})
IMPORTORSKIP_REASON = re.compile(r"could not import '([\w.]+)'")


def ci() -> bool:
    """Whether this is a CI run (``CI=true``, as GitHub Actions, GitLab and ``.ci/run`` set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_reference_library(report) -> str | None:
    """The reference library whose failed import skipped ``report``'s test or module, or None."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    match = IMPORTORSKIP_REASON.search(str(report.longrepr[2]))
    if match and match.group(1).split(".")[0] in REFERENCE_LIBRARIES:
        return match.group(1)
    return None


def fail_if_reference_skip(report) -> None:
    """Under CI=true, turns a skip of a missing reference library into a failure with a one-line reason."""
    library = missing_reference_library(report) if ci() else None
    if library is None:
        return
    detail = str(report.longrepr[2]).split(": ", 1)[-1]                     # "No module named 'diffusers'"
    report.outcome = "failed"
    report.longrepr = (f"CI=true: the reference library {library.split('.')[0]!r} failed to import ({detail}); "
                       f"a CI run may not skip its tests: pip install -c requirements/constraints.txt -e '.[test]'")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    fail_if_reference_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    fail_if_reference_skip(outcome.get_result())
