# The two commands: `make demo` (set up, then benchmark the bundled demo VLMs) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test
setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/edgelmm demo

test: setup
	$(BIN)/python -m pytest
