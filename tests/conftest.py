"""Shared pytest configuration of the test suite."""

import os

# CI=true: a test skipped because a reference library (torch, diffusers, …) failed to import fails the run.
from _ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401

# The CLI's on-disk compilation cache (ddpm_jax/compile_cache.py) stays off in tests that call cli.main
# in-process, so nothing is written under ~/.cache; test_compile_cache.py turns it on in its subprocess.
os.environ.setdefault("DDPM_JAX_COMPILE_CACHE", "off")
