# fitscope: `make demo` and `make test` are all a new user types (both install first).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
BIN := $(VENV)/bin
# One stamp per install level: the core (make demo), the team stack, everything (make test).
STAMP := $(VENV)/.fitscope-core
TEAM_STAMP := $(VENV)/.fitscope-team
DEV_STAMP := $(VENV)/.fitscope-dev
PIP_INSTALL = $(BIN)/python -m pip install --quiet --disable-pip-version-check \
	$(if $(LOCAL_TORCH),--find-links $(TORCH_WHEELS)) \
	$(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
# torch never comes as PyPI's multi-GB CUDA build: from a directory of local CPU wheels
# where the machine has one (TORCH_WHEELS), else from PyTorch's CPU wheel index.
TORCH_WHEELS ?= /opt/wheels
TORCH_VERSION := $(shell sed -n 's/.*"torch==\([0-9.]*\)".*/\1/p' pyproject.toml)
LOCAL_TORCH := $(wildcard $(TORCH_WHEELS)/torch-$(TORCH_VERSION)+cpu-*.whl)
TORCH_INDEX_URL ?= $(if $(LOCAL_TORCH),,https://download.pytorch.org/whl/cpu)
export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg
# dvc with the venv first on PATH, so its stages find fitscope and fitscope-train.
DVC := PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc

.PHONY: install install-cluster install-team install-dev browser demo study test test-fast bench lint clean \
	stack stack-down

# The core: the study, sweeps, the search, the report and `mlflow ui` (no root needed).
install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@# A venv of an older checkout has the released Optuna sweeper: it pins optuna<3 and
	@# registers the config names of fitscope's own search sweeper.
	@$(BIN)/python -m pip uninstall --quiet --yes hydra-optuna-sweeper 2>/dev/null || true
	$(PIP_INSTALL) -e .
	@touch $(STAMP)

# The cluster launchers (Ray, submitit): extra [cluster].
install-cluster: $(STAMP)
	$(PIP_INSTALL) -e '.[cluster]'

# The team stack (`make stack`) and the cluster launchers: extras [team] (with [cluster]).
install-team: $(TEAM_STAMP)

$(TEAM_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[team]'
	@touch $(TEAM_STAMP)

# Everything the tests cover, the test and lint tools, and the browser test's Chromium.
install-dev: $(DEV_STAMP) browser

$(DEV_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[dev]'
	@touch $(DEV_STAMP)

# The mlflow ui browser test drives Debian's chromium (playwright cannot download one
# here): installed where this runs as root with apt (CI); elsewhere the test says how.
browser:
	@command -v chromium >/dev/null || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq chromium; } \
		|| echo "note: no chromium; the browser test will fail until it is installed (see its message)"

# `dvc exp run` records a commit for the experiment; on machines with no git identity
# it gets a neutral one (only for that experiment, your git config is untouched).
DEMO_GIT_ID := $(if $(shell git config user.email 2>/dev/null),,GIT_AUTHOR_NAME=fitscope-demo \
	GIT_AUTHOR_EMAIL=demo@fitscope.invalid GIT_COMMITTER_NAME=fitscope-demo \
	GIT_COMMITTER_EMAIL=demo@fitscope.invalid)

demo: install
	$(DEMO_GIT_ID) $(DVC) exp run -S study.profile=quick
	@echo
	@echo "fitscope demo done (quick profile: shortened runs, labelled as such in the report)"
	@$(BIN)/fitscope summary
	@echo "DVC:      .venv/bin/dvc metrics show | .venv/bin/dvc plots show | .venv/bin/dvc exp show"
	@echo "registry: models:/fitscope-higgs@quick  (@champion comes from the classic study only)"
	@echo "classic:  git checkout HEAD -- params.yaml dvc.lock && .venv/bin/dvc repro   (the full protocol)"

# The classic study: `dvc repro`. DVC runs one stage at a time in a workspace; a train stage
# trains its dataset's variants study.jobs at a time (auto: one per core, docs/pipeline.md).
study: install
	$(DVC) repro
	@echo
	@$(BIN)/fitscope summary

# Two pytest workers, one test file each at a time (module fixtures are built once); the
# slow files first (tests/conftest.py), so the two long ones do not end up last in one queue.
# --durations: the slowest tests in every CI log, to keep `make test` under 15 minutes.
test: install-dev
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=15

test-fast: install-dev
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow"

# Prints the figures and merges them into reports/bench.json; BENCH_ARGS=--study also
# times the classic study (dvc repro) in a scratch copy.
bench: install-team
	$(BIN)/python -m fitscope.bench $(BENCH_ARGS)

# The local team stack (docs/team.md): PostgreSQL, SeaweedFS S3, MLflow server (basic auth),
# a Ray head, all on 127.0.0.1; writes stack.env and the DVC remote `team`. Data persists.
stack: install-team
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/fitscope stack up

stack-down:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/fitscope stack down

# ruff, and the layer rule of docs/architecture.md (import-linter contracts in pyproject.toml).
lint: install-dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf outputs multirun dvc_plots .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
