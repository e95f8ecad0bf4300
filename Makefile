# The two commands: `make demo` (set up, then benchmark the bundled demo VLMs) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-dev demo lint test
setup:
	@bash scripts/setup.sh

setup-dev:
	@bash scripts/setup.sh dev

demo: setup
	$(BIN)/edgelmm demo

lint: setup-dev
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest
