# cellst: one-command set-up, demo and tests.  Every target is idempotent.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-dev demo demo-quick test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(DEVSTAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(STAMP)         ## create .venv and install cellst
setup-dev: $(DEVSTAMP)  ## create .venv and install cellst with test tools

demo: setup             ## the main job on the embedded synthetic data
	$(BIN)/python experiments/run_demo.py

demo-quick: setup
	$(BIN)/python experiments/run_demo.py --quick

test: setup-dev         ## the whole test suite
	$(BIN)/python -m pytest -q tests

lint: setup-dev
	$(BIN)/ruff check platform tests benchmarks experiments
	$(BIN)/ruff format --check platform tests benchmarks experiments

format: setup-dev
	$(BIN)/ruff format platform tests benchmarks experiments
	$(BIN)/ruff check --fix platform tests benchmarks experiments

bench: setup-dev        ## speed and memory benchmarks (ratios, side by side)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache demo_out
