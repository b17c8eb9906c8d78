# The two quick-start commands:  `make demo`  and  `make test`.
# Each creates ./.venv on first use (Python >= 3.11 and pip are all a fresh machine needs).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c requirements/constraints.txt
WORKDIR ?= runs/mnist
PYTEST_ARGS ?=

.PHONY: demo test venv venv-test clean

$(VENV)/.base: setup.cfg pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test]'
	touch $@

$(VENV)/.notebooks: $(VENV)/.base
	$(PIP) -e '.[notebooks]'
	touch $@

venv: $(VENV)/.base
venv-test: $(VENV)/.test

## make demo: train the default MNIST DDPM on the CPU (~7 min on 2 cores) and write samples + figures to $(WORKDIR)
demo: $(VENV)/.base
	$(VENV)/bin/ddpm-jax demo --workdir $(WORKDIR)

## make test: the whole test suite (what CI runs), on TEST_WORKERS pytest-xdist workers (one per core of CI's two;
## each test module on one worker, see tests/conftest.py); `make test TEST_WORKERS=0` runs it in one process
TEST_WORKERS ?= 2
test: $(VENV)/.test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests $(PYTEST_ARGS)

## make notebooks: open the lecture notebooks in JupyterLab, with this project's .venv as the kernel
.PHONY: notebooks
notebooks: $(VENV)/.notebooks
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) runs
