"""Shared pytest configuration of the test suite."""

# CI=true: a test skipped because a reference library (torch, diffusers, …) failed to import fails the run.
from _ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401
