"""Issue 19, item 3: with CI=true a reference library that fails to import fails the run instead of skipping.

A tiny pytest session runs in a subprocess with ``diffusers`` made unimportable (a ``sitecustomize`` on its
PYTHONPATH puts a finder first in ``sys.meta_path`` that raises ModuleNotFoundError for it, as a failed
install would) and this suite's plugin (tests/_ci_skips.py, what tests/conftest.py loads): a module-level
``importorskip`` and one inside a test. Without CI=true both are skips and the session passes; with CI=true
it fails and says which library and how to install it. A skip for another reason stays a skip under CI.
And the suite itself: with nbformat unimportable and CI=true, collecting tests/test_notebooks.py fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))

SITECUSTOMIZE = '''
import importlib.abc, os, sys

class Unimportable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == os.environ["UNIMPORTABLE"]:
            raise ModuleNotFoundError(f"No module named {name!r} (made unimportable by the test)", name=name)
        return None

sys.meta_path.insert(0, Unimportable())
'''

MODULE_LEVEL = '''
import pytest
diffusers = pytest.importorskip("diffusers")

def test_parity():
    assert diffusers
'''

INSIDE_AND_OTHER = '''
import pytest

def test_inside():
    pytest.importorskip("diffusers.schedulers")

def test_runs():
    assert True

def test_optional_widget():
    pytest.importorskip("a_widget_library_nobody_installed")
'''


def shim_env(tmp_path, library, ci, *pythonpath):
    """The environment of a subprocess in which ``library`` cannot be imported (and CI=true if ``ci``)."""
    (tmp_path / "shim").mkdir(exist_ok=True)
    (tmp_path / "shim" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "shim"), *pythonpath])
    env["UNIMPORTABLE"] = library
    if ci:
        env["CI"] = "true"
    return env


def run_session(tmp_path, ci):
    (tmp_path / "test_module_level.py").write_text(MODULE_LEVEL)
    (tmp_path / "test_inside.py").write_text(INSIDE_AND_OTHER)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")                  # not the repository's configuration
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "_ci_skips", "-p", "no:cacheprovider", "-rA",
                           "--continue-on-collection-errors", str(tmp_path)], cwd=tmp_path,
                          env=shim_env(tmp_path, "diffusers", ci, TESTS), capture_output=True, text=True, timeout=120)


def test_without_ci_a_missing_reference_library_is_a_skip(tmp_path):
    out = run_session(tmp_path, ci=False)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "1 passed, 3 skipped" in out.stdout, out.stdout[-3000:]
    assert "made unimportable by the test" in out.stdout                  # the shim really was in place


def test_with_ci_true_a_missing_reference_library_fails_the_run(tmp_path):
    out = run_session(tmp_path, ci=True)
    assert out.returncode == 1, out.stdout[-3000:]
    assert "1 failed, 1 passed, 1 skipped, 1 error" in out.stdout, out.stdout[-3000:]
    assert "ERROR test_module_level.py" in out.stdout and "FAILED test_inside.py::test_inside" in out.stdout
    assert "CI=true: the reference library 'diffusers' failed to import" in out.stdout
    assert "SKIPPED [1] test_inside.py" in out.stdout                     # not a reference library: still a skip


def test_the_suite_itself_fails_under_ci_when_a_reference_library_cannot_be_imported(tmp_path):
    """The repository's own pyproject and conftest and a real module of the suite, collected only (nbformat is its
    first non-standard import after pytest, so the subprocess stays cheap; a parity module would import jax)."""
    repo = os.path.dirname(TESTS)
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_notebooks.py"], cwd=repo,
                         env=shim_env(tmp_path, "nbformat", True, repo), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, out.stdout[-3000:]
    assert "CI=true: the reference library 'nbformat' failed to import" in out.stdout, out.stdout[-3000:]


FAKE_MAKE = '''#!/usr/bin/env bash
# stands in for `make test`: checks CI=true, writes the JUnit report pytest would, fails like a failing suite
[ "$1" = test ] && [ "$CI" = true ] || exit 99
report="$(printf '%s\\n' "$2" | sed -n 's/.*--junitxml=\\([^ ]*\\).*/\\1/p')"
cat > "$report" <<'XML'
<testsuites><testsuite name="pytest" tests="5" failures="1" errors="1" skipped="1"></testsuite></testsuites>
XML
exit 1
'''


def test_ci_run_sets_ci_true_and_prints_how_many_tests_ran(tmp_path):
    fake = tmp_path / "bin" / "make"
    fake.parent.mkdir()
    fake.write_text(FAKE_MAKE)
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = os.pathsep.join([str(fake.parent), env["PATH"]])
    out = subprocess.run([os.path.join(os.path.dirname(TESTS), ".ci", "run")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stdout.strip().splitlines()[-1] == (
        "ci: 5 tests ran: 2 passed, 1 skipped, 1 failed, 1 errors (CI=true; exit status 1)")
