# Two set-up commands: `make demo` and `make test`. Both create .venv when it is absent or incomplete;
# `demo` installs the package alone, `test` adds the test extras (web service, Grad-CAM, ONNX, hub, pytest).
PYTHON ?= python3
VENV := .venv
BASE := $(VENV)/.installed-base
FULL := $(VENV)/.installed-test
FLOORS := .venv-floors

.PHONY: demo test install floors clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip >/dev/null

$(BASE): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -e .
	@touch $(BASE)

$(FULL): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -e '.[test]'
	@touch $(FULL) $(BASE)

install: $(BASE)

demo: $(BASE)
	$(VENV)/bin/melanoma-siamese demo --out runs/demo

test: $(FULL)
	$(VENV)/bin/python -m pytest --durations=15

# The declared lower bounds, tested: a fresh environment with every `>=` in pyproject.toml pinned to that exact
# version (the package, its test extras included), then the suite less the slow tests.
floors:
	rm -rf $(FLOORS)
	$(PYTHON) -m venv $(FLOORS)
	$(FLOORS)/bin/python -m pip install --upgrade pip >/dev/null
	$(PYTHON) tools/floor_constraints.py pyproject.toml --extras test > $(FLOORS)/constraints.txt
	$(FLOORS)/bin/python -m pip install -c $(FLOORS)/constraints.txt -e '.[test]'
	$(FLOORS)/bin/python -m pip freeze > $(FLOORS)/freeze.txt
	$(FLOORS)/bin/python -m pytest -m "not slow" -p no:cacheprovider

clean:
	rm -rf runs .pytest_cache
