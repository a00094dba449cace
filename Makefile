# Set-up and checks. `make demo` and `make test` work on a fresh machine:
# each creates .venv and installs what it needs first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. --index-url https://download.pytorch.org/whl/cpu
# for the CPU build on a machine without a GPU and without a local torch wheel.
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: left to the resolver, it may pull a multi-GB build.
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	# constraints.txt pins the versions the suite last passed with.
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/imagen demo

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check imagen consumer serve_app tests bench
	$(BIN)/python -m tests.lint_container

bench: install
	$(BIN)/python bench/queue_latency.py
	$(BIN)/python bench/serve_overhead.py

clean:
	rm -rf $(VENV) .data
