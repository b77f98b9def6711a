# lotus: two entry points on a fresh machine.
#   make demo   - create .venv if missing, install, run the offline demo recipe, print the report path
#   make test   - create .venv if missing, install .[dev], run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning (10x faster on a loaded 2-core machine,
# same numbers; benchmarks/results/demo_seeds.md).
demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/lotus compress recipes/demo.yaml --out runs/demo --force
	@echo "report: runs/demo/bench/report.md"

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Everything but the slow end-to-end and real-data tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
