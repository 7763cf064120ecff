# Two entry points (README "Quick start"): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, as pip is configured plus TORCH_PIP_ARGS. From PyPI, torch 2.13's Linux wheel is
# the CUDA 13.0 build; TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" takes the
# CPU build. The dev and CI machines find the CPU wheel in pip's local wheel folder.
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=

# The other dependencies at the versions of constraints.txt (CI's tested set).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt "$(TORCH)" -e ".[dev]"
	touch $@

.PHONY: setup demo test lint docs constraints constraints-lowest test-lowest
setup: $(VENV)/.installed

# constraints.txt anew: the newest versions pyproject.toml admits, installed in a scratch venv.
constraints:
	rm -rf .venv-constraints && python3 -m venv .venv-constraints
	.venv-constraints/bin/pip install -q --upgrade pip
	.venv-constraints/bin/pip install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	.venv-constraints/bin/pip install -q "$(TORCH)" -e ".[dev]"
	{ sed -n '/^#/p' constraints.txt; .venv-constraints/bin/pip freeze --exclude-editable \
	  | grep -v -i '^torch=='; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf .venv-constraints

# The oldest versions pyproject.toml admits (README "Install"): constraints-lowest.txt pins each
# direct dependency at its range's lower end (.ci/constraints_lowest.py, with uv's resolver), and
# test-lowest runs the unit tests on that set in .venv-lowest. From PyPI, that torch (2.9) is a
# CUDA build (6.6 GB installed with its CUDA libraries and triton); it trains on the CPU all the
# same.
TORCH_LOWEST = $(shell grep '^torch==' constraints-lowest.txt)
constraints-lowest:
	rm -rf .venv-uv && python3 -m venv .venv-uv && .venv-uv/bin/pip install -q uv packaging
	.venv-uv/bin/python .ci/constraints_lowest.py .venv-uv/bin/uv constraints-lowest.txt
	rm -rf .venv-uv

test-lowest:
	rm -rf .venv-lowest && python3 -m venv .venv-lowest
	.venv-lowest/bin/pip install -q --upgrade pip
	.venv-lowest/bin/pip install -q $(TORCH_PIP_ARGS) -c constraints-lowest.txt "$(TORCH_LOWEST)"
	.venv-lowest/bin/pip install -q -c constraints-lowest.txt "$(TORCH_LOWEST)" -e ".[dev]"
	.venv-lowest/bin/python -m pytest -q -n 2 tests/unit

demo: $(VENV)/.installed
	$(PY) -m raysft.tune search_spaces/lora.yaml

# Two xdist workers: each runs a lane of integration tests in order, side by side, then unit
# tests (tests/conftest.py says why and how).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check raysft tests benchmarks && $(VENV)/bin/ruff format --check raysft tests benchmarks
	$(VENV)/bin/mypy raysft

docs: $(VENV)/.installed
	$(PY) -m raysft.docs --write README.md
