# cellst: one-command set-up, demo and tests.  Every target is idempotent.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-dev demo demo-quick test test-host test-fast lint format bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Ray's clusters turn token authentication on by default, and `ray start` / `ray.init()`
# find the token in ~/.ray/auth_token, but the `ray job` CLI only looks when RAY_AUTH_MODE
# is "token": this .pth sets that default for the venv's processes when a token exists.
RAY_TOKEN_PTH := import os; os.environ.get("RAY_AUTH_MODE") or not (os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token"))) or os.environ.update(RAY_AUTH_MODE="token")

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -c 'import sys, sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()["purelib"], "cellst-ray-token.pth").write_text(sys.argv[1] + "\n")' '$(RAY_TOKEN_PTH)'
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

# the launcher test (tests/test_ray_up.py) logs in over SSH to this machine's sshd as a user
# of its own: it needs openssh-server, rsync and Debian's python3.11 (root, with apt)
HOST_TOOLS := /usr/sbin/sshd /usr/bin/rsync /usr/bin/python3.11
test-host:              ## what the launcher test needs from this machine (apt, as root)
	@for t in $(HOST_TOOLS); do [ -x $$t ] || missing=1; done; [ -z "$$missing" ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      openssh-server rsync python3.11 >/dev/null; } || \
	  echo "note: tests/test_ray_up.py needs $(HOST_TOOLS) (apt-get install openssh-server rsync python3.11, as root)"

test: setup-dev test-host ## the whole test suite (benchmark smoke runs and the quick demo included)
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: setup-dev    ## the inner loop: every test that needs no Ray cluster, training or server
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: setup-dev
	$(BIN)/ruff check platform tests benchmarks experiments
	$(BIN)/ruff format --check platform tests benchmarks experiments

format: setup-dev
	$(BIN)/ruff format platform tests benchmarks experiments
	$(BIN)/ruff check --fix platform tests benchmarks experiments

bench: setup-dev        ## speed, memory and quality benchmarks on CPU (ratios, side by side)
	for b in benchmarks/bench_*.py; do \
	  [ $$b = benchmarks/bench_gpu.py ] || $(BIN)/python $$b || exit 1; done

gpu-check:              ## the GPU paths (on a machine with one NVIDIA GPU; about 8 minutes)
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache demo_out
