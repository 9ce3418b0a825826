# The two commands a new user needs:  `make serve`  and  `make test`.
# Both set everything up first (idempotent; a no-op the second time).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.loramux-installed
ARGS   ?=

.PHONY: setup serve test test-fast prometheus clean

# torch first, pinned: on the CPU dev machines `torch==2.13.0` is a CPU wheel already on disk,
# while any other spec would download a multi-GB CUDA build. The project's own range admits it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[convert,test]'
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/loramux fetch-default-model

serve: setup
	$(BIN)/loramux serve $(ARGS)

# Prometheus for tests/test_prometheus.py (Debian's package; a no-op once installed).
prometheus:
	sh deploy/prometheus/install.sh

test: setup prometheus
	$(BIN)/python -m pytest -q --durations=25 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV)
