# Coordinator: local development (GNU make). A fresh machine needs only python3 >= 3.11:
# Postgres and the Temporal dev server come from PyPI wheels.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install lock dev lint test test-deps test-faults bench record-histories clean-data

help:
	@echo "make install      create $(VENV) and install the project with its dev extras (pinned: requirements-dev.lock)"
	@echo "make lock         regenerate requirements.lock (runtime, the Docker image) and requirements-dev.lock"
	@echo "                  from pyproject.toml; UPGRADE=1: move every pin to the newest version allowed"
	@echo "make dev          run the whole stack locally (Postgres, Temporal + UI, worker, API on :4000)"
	@echo "                  REPLICAS=2: two workers, two dispatchers, two API processes"
	@echo "make lint         ruff check and mypy (settings in pyproject.toml)"
	@echo "make test         run the test suite (real Postgres and Temporal, started per session)"
	@echo "make test-deps    system packages some tests need (Debian/Ubuntu: chromium for the Temporal UI and inspector tests, redis-server for the relay tests)"
	@echo "make test-faults  run the fault-injection tests (tests/faults)"
	@echo "make bench ARGS=  run the benchmarks (python -m bench \$$ARGS)"
	@echo "make record-histories  re-record the workflow histories the replay tests use"
	@echo "make clean-data   delete .data/ (local Postgres data, Temporal state, keys, tokens, logs)"

# The pinned, hashed dependencies from requirements-dev.lock, then the project itself (editable, no
# dependency resolution). Reinstalled whenever pyproject.toml or the lock changes.
$(VENV)/.installed: pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q --upgrade pip \
		&& $(VENV)/bin/pip install -q -r requirements-dev.lock \
		&& $(VENV)/bin/pip install -q --no-deps -e . && touch $@

install: $(VENV)/.installed

# Re-resolve both lock files from pyproject.toml, with hashes, as one lock for every platform and
# Python >= 3.11 (the image runs 3.12). Versions already locked stay where pyproject.toml still allows
# them; UPGRADE=1: the newest versions the ranges allow. uv comes with the dev extras; without a venv
# yet it is installed on its own.
UV := $(VENV)/bin/uv
UPGRADE ?= 0
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --quiet --custom-compile-command "make lock" \
	$(if $(filter 1,$(UPGRADE)),--upgrade)
lock:
	@test -x $(UV) || { $(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q uv; }
	$(UV) pip compile pyproject.toml $(LOCK_FLAGS) -o requirements.lock
	$(UV) pip compile pyproject.toml --extra dev $(LOCK_FLAGS) -o requirements-dev.lock

# REPLICAS=N: N workers, N dispatchers and N API processes (default: 1, 1, one API process per core).
dev: $(VENV)/.installed
	$(if $(REPLICAS),REPLICAS=$(REPLICAS) )$(PY) -m devstack.dev

# Static checks only: ruff (lint rules, no formatting) over the tree, mypy over the packages named in
# pyproject.toml ([tool.mypy] files; strict for rules/, workflows/ and api/auth/).
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy

# pytest exits 5 when it collected no tests: that is a failure here too.
test: $(VENV)/.installed test-deps
	@$(PY) -m pytest -q -x -m "not faults" --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$rc

# System packages (apt) a few tests use; each test skips with a message when its package is missing.
# Needs root, or sudo.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
test-deps:
	@if ! command -v apt-get >/dev/null 2>&1; then \
		echo "make test-deps: no apt-get here: install Chromium yourself (tests/test_temporal_ui.py and tests/test_inspector.py skip without /usr/bin/chromium)"; \
	elif command -v chromium >/dev/null 2>&1; then \
		echo "make test-deps: chromium already installed"; \
	else \
		($(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
			|| echo "make test-deps: could not install chromium; the browser tests will skip"; \
	fi
	@if ! command -v apt-get >/dev/null 2>&1; then \
		command -v redis-server >/dev/null 2>&1 || echo "make test-deps: no apt-get here: install redis-server yourself (the Redis relay tests skip without it)"; \
	elif command -v redis-server >/dev/null 2>&1; then \
		echo "make test-deps: redis-server already installed"; \
	else \
		($(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server) \
			|| echo "make test-deps: could not install redis-server; the relay tests will skip"; \
	fi

test-faults: $(VENV)/.installed
	@if [ -d tests/faults ]; then \
		$(PY) -m pytest -q -m faults tests/faults; \
	else \
		echo "make test-faults: tests/faults does not exist yet, no fault tests to run"; \
	fi

bench: $(VENV)/.installed
	$(PY) -m bench $(ARGS)

record-histories: $(VENV)/.installed
	RECORD_HISTORIES=1 $(PY) -m pytest -q tests/test_record_histories.py

clean-data:
	rm -rf .data
