# The two set-up commands of the README. Each installs distill (with test extras) into the active
# Python first, so on a fresh machine nothing else is needed.
PYTHON ?= python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install quickstart test test-fast lint bench

install:
	$(PYTHON) -m pip install -e ".[test]"

quickstart: install
	distill launch configs/quickstart.yaml

test: install
	ruff check .
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

bench: install
	$(PYTHON) benchmarks/run.py
