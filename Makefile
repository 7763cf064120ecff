# Two entry points (README "Quick start"): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine install your torch first (see README, Install).
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $@

.PHONY: setup demo test lint docs
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m raysft.tune search_spaces/lora.yaml

# Two xdist workers: each runs a lane of integration tests in order, side by side, then unit
# tests (tests/conftest.py says why and how).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check raysft tests && $(VENV)/bin/ruff format --check raysft tests
	$(VENV)/bin/mypy raysft

docs: $(VENV)/.installed
	$(PY) -m raysft.docs --write README.md
