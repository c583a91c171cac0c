# Two set-up commands on a fresh machine:
#   make serve   create .venv, install sidegate, run the gateway on embedded defaults
#   make test    create .venv, install sidegate with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test bench bench-quick bench-micro install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

$(VENV)/.bench-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

serve: install
	$(BIN)/sidegate serve

test: install
	$(BIN)/python -m pytest -q

bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench

bench-quick: $(VENV)/.bench-installed
	$(BIN)/python -m bench --quick

bench-micro: install
	$(BIN)/python -m pytest bench/bench_codecs.py bench/bench_governance.py bench/bench_traces.py --benchmark-enable -q

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
