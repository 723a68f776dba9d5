# The two entry points a newcomer needs: `make demo` and `make test`.
# Everything else (the virtual environment, the control-plane binaries) is built on
# first use and cached, so both work on a fresh machine.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint unit property integration faults controlplane helm bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

controlplane: $(STAMP)
	$(PY) -m testbed.controlplane.build

# The helm CLI the chart check renders deploy/helm/chscale with (ADR 0012): built from
# the Go module proxy once, cached beside the control plane (a cold build is minutes).
helm: $(STAMP)
	$(PY) -m testbed.controlplane.build --helm

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

unit: $(STAMP)
	$(PY) -m pytest tests/unit

property: $(STAMP)
	$(PY) -m pytest tests/property

integration: controlplane helm
	$(PY) -m pytest tests/integration

# Everything, the CI-sized fault run (50 seeded schedules, about 7 minutes) included.
test: lint controlplane helm
	$(PY) -m pytest tests

# Only the fault schedules; CHSCALE_FAULT_SCHEDULES=N for more, CHSCALE_FAULT_SEED=S to
# start elsewhere.
faults: controlplane
	$(PY) -m pytest tests/integration/test_faults.py

demo: controlplane
	$(VENV)/bin/chscale demo

bench: controlplane
	$(PY) -m bench.kernel
	$(PY) -m bench.controlplane

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
