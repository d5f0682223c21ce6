# fedscan: `make run` and `make test` work on a fresh machine (they create .venv).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Every pip call goes through the constraints file: torch==2.13.0 installs from the
# local CPU wheel; anything looser would download a multi-GB CUDA build.
PIP := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.fedscan-installed

.PHONY: install run test lint typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(PIP) install -c $(CONSTRAINTS) -e '.[test]'
	# Google's dp-accounting is the tests' independent epsilon oracle. Every release pins
	# attrs<24 (or numpy 1.x), which clashes with flwr's pins; it works with ours, so it
	# is installed without its pins, its real dependencies pinned here instead.
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(PIP) install -c $(CONSTRAINTS) absl-py dm-tree wrapt
	$(PIP) install --no-deps dp-accounting==0.6.0
	@touch $@

run: $(STAMP)
	$(VENV)/bin/fedscan run

# The gates CI enforces (.ci/run calls `make test`): lint, types, then the tests.
test: lint typecheck
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m benchmarks.bench_federation
	$(PY) -m benchmarks.bench_dp
	$(PY) -m benchmarks.bench_sweep

clean:
	rm -rf .cache .flwr .ray outputs .pytest_cache
