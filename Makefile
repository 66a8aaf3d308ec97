# Two set-up commands: `make demo` and `make test`. Both create .venv when it is absent or incomplete.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip >/dev/null
	$(VENV)/bin/python -m pip install -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/melanoma-siamese demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest --durations=15

clean:
	rm -rf runs .pytest_cache
