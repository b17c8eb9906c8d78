"""tests/conftest.py's settings: the compile-level markers and torch's OpenMP wait policy."""

import os

import jax
import pytest

from conftest import FAST_COMPILE_ENV


@pytest.mark.fast_compile
def test_a_test_level_fast_compile_marker_turns_the_backend_optimisation_off_for_that_test():
    assert jax.config.read("jax_disable_most_optimizations") is True
    assert os.environ[FAST_COMPILE_ENV] == "1"  # and in the subprocesses the test starts


def test_an_unmarked_test_in_an_unmarked_module_keeps_the_session_level():
    assert jax.config.read("jax_disable_most_optimizations") is (os.environ.get(FAST_COMPILE_ENV) == "1")


def test_torch_threads_wait_passively():
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # set before any test module imports torch
