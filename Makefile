# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned in the same pip call as nnunetv2: otherwise its dependencies pull a multi-GB CUDA build.
PIP_PINS := torch==2.13.0 nnunetv2==2.8.1
PYTEST := $(BIN)/python -m pytest -q --durations=10

.PHONY: install demo lint test test-fast clean

$(BIN)/lifelong-nnunet: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_PINS) -e '.[test]'
	touch $@

install: $(BIN)/lifelong-nnunet

demo: install
	$(BIN)/lifelong-nnunet demo -o runs/demo

lint: install
	$(BIN)/ruff check .

# the whole suite, end-to-end runs included (about 18 min on 2 CPU cores, measured before the speed-ups of
# benchmarks/results/test_suite_speed.md; not measured since), after the linter
test: lint
	$(PYTEST) tests

# the edit loop: everything but the tests marked slow (the end-to-end runs that train)
test-fast: lint
	$(PYTEST) -m "not slow" tests

clean:
	rm -rf $(VENV) runs
