# Set-up and entry points. Both `make demo` and `make test` create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
# The pinned torch pair this project is tested with (pip takes them from the local wheel cache here).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: demo test lint venv clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The stamp is rebuilt when pyproject.toml changes, so new dependencies are picked up.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/attrib demo

test: venv
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python benchmarks/bench_index.py
	$(BIN)/python benchmarks/bench_query.py

clean:
	rm -rf $(VENV) build *.egg-info
