"""Shared pytest configuration of the test suite."""

import contextlib
import os

import pytest

# torch's OpenMP threads (libgomp) sleep when idle instead of spinning: read once, when torch's library loads, so set
# before any test module imports torch (subprocesses inherit it). Spinning threads on 2 cores shared with the other
# xdist worker (and whatever else runs) wait for each other a whole scheduler slice at every parallel region: measured
# on 2 busy cores (load 5), one [2, 32, 8, 8] 3×3 conv2d took 31 ms spinning, 0.16–0.33 ms passive, and a tiny
# diffusers U-Net call 1.4 s vs 9 ms. It changes how idle threads wait, not what is computed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# CI=true: a test skipped because a reference library (torch, diffusers, …) failed to import fails the run.
from _ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401

# The CLI's on-disk compilation cache (ddpm_jax/compile_cache.py) stays off in tests that call cli.main
# in-process, so nothing is written under ~/.cache; test_compile_cache.py turns it on in its subprocess.
os.environ.setdefault("DDPM_JAX_COMPILE_CACHE", "off")

# Compile-bound test modules (tiny models, a few calls each: parity tests, sampling wiring, benchmark smokes) set
# `pytestmark = pytest.mark.fast_compile`: their programs compile with XLA's backend optimisation off
# (jax_disable_most_optimizations: LLVM at level 0, no expensive passes), in this process and in the
# subprocesses they start. It changes how XLA compiles, not what is computed. Measured on 2 busy cores:
# test_every_solver + test_stable_diffusion + test_unet 598 → 379 CPU s (same tests passing); but training
# loops, 1000-step chains and the Inception network run 2–5× slower unoptimised, so it is not the default.
# A test in such a module that runs long programs opts back in with `@pytest.mark.full_optimization`.
# A compile-bound test in a module that is not is marked `@pytest.mark.fast_compile` itself (its own programs only).
FAST_COMPILE_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"


def pytest_configure(config):
    config.addinivalue_line("markers", "fast_compile: (module or test) compile the module's (the test's) programs "
                                       "without XLA's backend optimisation (tests/conftest.py)")
    config.addinivalue_line("markers", "full_optimization: (test) compile at XLA's default level inside a "
                                       "fast_compile module")


@contextlib.contextmanager
def _disable_most_optimizations(on: bool):
    import jax

    before, env_before = jax.config.read("jax_disable_most_optimizations"), os.environ.get(FAST_COMPILE_ENV)
    jax.config.update("jax_disable_most_optimizations", on)
    os.environ[FAST_COMPILE_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
        if env_before is None:
            os.environ.pop(FAST_COMPILE_ENV, None)
        else:
            os.environ[FAST_COMPILE_ENV] = env_before


@pytest.fixture(scope="module", autouse=True)
def _module_compile_level(request):
    """Module scope, so that the module's own fixtures (trained workdirs, pipelines) compile fast too."""
    if request.node.get_closest_marker("fast_compile") is None:
        yield
        return
    with _disable_most_optimizations(True):
        yield


@pytest.fixture(scope="module")
def shared_compilation_cache():
    """The suite's persistent compilation cache (tests/_training_fixtures.py) for the module's compiles, in this process
    and in the subprocesses it starts: a module that compiles the same program more than once (a model loaded again
    builds new jitted functions; two benchmarks on one tiny config) compiles it once. Use it with
    ``pytestmark = pytest.mark.usefixtures("shared_compilation_cache")``."""
    from _training_fixtures import CACHE_ENV, in_process_compilation_cache

    with pytest.MonkeyPatch.context() as env, in_process_compilation_cache():
        for name, value in CACHE_ENV.items():
            env.setenv(name, value)
        yield


@pytest.fixture(autouse=True)
def _test_compile_level(request):
    if request.node.get_closest_marker("full_optimization") is not None:
        fast = False
    elif (request.node.get_closest_marker("fast_compile") is not None
          and request.node.getparent(pytest.Module).get_closest_marker("fast_compile") is None):
        fast = True  # one compile-bound test in a module that is not
    else:
        yield
        return
    with _disable_most_optimizations(fast):
        yield


# `make test` runs the suite on two pytest-xdist workers with `--dist loadgroup`: every module's tests go to one
# worker together, so its module fixtures (trained workdirs, tiny pipelines, cached programs) are built once;
# the notebooks, which share nothing, are spread one by one.
SPREAD_MODULES = {"test_notebooks"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ not in SPREAD_MODULES:
            item.add_marker(pytest.mark.xdist_group(module.__name__))
