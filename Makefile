# One task runner, the same locally and in CI. `make demo` and `make test` set everything up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
REDIS_URL ?= redis://127.0.0.1:6379/0
# Test processes (pytest-xdist), each with its own Chromium, fixture sites and Redis database.
TEST_PROCESSES ?= 2
export REDIS_URL

.PHONY: setup venv system redis demo test lint format bench bench-browsers chaos clean

setup: $(STAMP) system redis

# The venv is rebuilt only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory venv VENV=$(VENV)
	@echo "installing formwork and its dev tools into $(VENV)"
	@( $(PY) -m pip install --disable-pip-version-check --upgrade pip \
	  && $(PY) -m pip install --disable-pip-version-check -e '.[dev]' ) > $(VENV)/install.log 2>&1 \
	  || { tail -n 30 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

# A venv whose python runs pip. Debian's python3 makes one only with python3-venv installed
# (installed here when missing and we are root; otherwise say how); without it, `python3 -m
# venv` leaves a venv with no pip behind, so one without pip is made again, not installed into.
venv:
	@if ! $(PY) -m pip --version >/dev/null 2>&1; then \
	  if ! out=$$(python3 -m venv --clear $(VENV) 2>&1); then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "installing python3-venv with apt-get"; \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
	      && python3 -m venv --clear $(VENV) || exit 1; \
	    else \
	      echo "$$out" | tail -n 3; echo "missing: python3-venv. Run: sudo apt-get install -y python3-venv"; exit 1; \
	    fi; \
	  fi; \
	fi

# Debian's Chromium and Redis: installed when missing and we are root; otherwise say how.
system:
	@need=""; \
	if [ -n "$$FORMWORK_CHROMIUM" ] && [ ! -x "$$FORMWORK_CHROMIUM" ]; then \
	  echo "FORMWORK_CHROMIUM=$$FORMWORK_CHROMIUM is not an executable file: set it to a Chromium, or unset it for Debian's"; exit 1; \
	fi; \
	if [ -z "$$FORMWORK_CHROMIUM" ] && ! command -v chromium >/dev/null 2>&1; then need="$$need chromium"; fi; \
	if ! command -v redis-server >/dev/null 2>&1; then need="$$need redis-server"; fi; \
	if [ -n "$$need" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$need with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
	  else \
	    echo "missing:$$need. Run: sudo apt-get install -y$$need"; exit 1; \
	  fi; \
	fi

# Start a local Redis when none answers at REDIS_URL (waits until it answers).
redis: $(STAMP)
	@$(PY) -m worker.localredis "$(REDIS_URL)"

demo: setup
	@$(BIN)/formwork demo

lint: $(STAMP)
	$(BIN)/ruff check worker fixtures tests bench
	$(BIN)/ruff format --check worker fixtures tests bench
	$(BIN)/mypy worker fixtures

format: $(STAMP)
	$(BIN)/ruff check --fix worker fixtures tests bench
	$(BIN)/ruff format worker fixtures tests bench

test: setup lint
	$(BIN)/formwork validate
	$(BIN)/pytest -n $(TEST_PROCESSES)

# Benchmarks print tables and append them to bench/RESULTS.md (under 10 minutes in all on 2
# cores: 6 min 10 s to 6 min 39 s on a quiet machine, 8 min 41 s and 9 min 40 s with other test
# suites running alongside). `python bench/ablation.py` is the profile behind them (2 min).
bench: setup
	$(PY) bench/overhead.py
	$(PY) bench/latency.py
	$(PY) bench/throughput.py
	$(PY) bench/memory.py

# Debian's chromium against its chromium-headless-shell, side by side (~1 min): what the choice
# of FORMWORK_CHROMIUM is worth. The shell is installed for it when missing and we are root.
bench-browsers: setup
	@if [ ! -x /usr/lib/chromium/chromium-headless-shell ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium-headless-shell with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell >/dev/null; \
	  else \
	    echo "missing: chromium-headless-shell. Run: sudo apt-get install -y chromium-headless-shell"; exit 1; \
	  fi; \
	fi
	$(PY) bench/browsers.py

chaos: setup
	$(PY) bench/chaos.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
