# fitscope: `make demo` and `make test` are all a new user types (both install first).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
BIN := $(VENV)/bin
STAMP := $(VENV)/.fitscope-installed
# Optional extra index for torch wheels, e.g. a CPU-only wheel index on machines
# that have no local torch wheel (the default index serves the CUDA build).
TORCH_INDEX_URL ?=
export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		$(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) -e '.[dev]'
	@touch $(STAMP)

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo "fitscope demo done: data splits in data/processed/ (manifest.json per dataset)"

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python -m fitscope.bench

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf outputs multirun dvc_plots .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
