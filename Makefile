# The two commands: `make demo` (set up, then benchmark the bundled demo VLMs) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-dev demo test
setup:
	@bash scripts/setup.sh

setup-dev:
	@bash scripts/setup.sh dev

demo: setup
	$(BIN)/edgelmm demo

test: setup-dev
	$(BIN)/python -m pytest
