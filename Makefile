# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Runs the quickstart grid locally and offline into ./mlflow.db, then writes the tidy CSV.
demo: install
	$(BIN)/sweep run sweeps/quickstart.yaml --executor local
	$(BIN)/sweep export sweeps/quickstart.yaml -o results/quickstart.csv
	@echo "browse the runs: $(BIN)/sweep ui sweeps/quickstart.yaml"

# pytest exits 5 when it collects no tests; that must fail too, so no special-casing here.
test: install-test
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf .submitit results mlflow.db mlruns
