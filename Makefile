# Two commands do all set-up on a fresh machine with Python >= 3.11:
#   make run    train the default toy task (python scripts/train_toy.py)
#   make test   run the test suite
# Both create (or reuse) .venv, pinned by constraints.txt.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test walkthrough bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

run: $(STAMP)
	$(BIN)/python scripts/train_toy.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q $(ARGS)

walkthrough: $(STAMP)
	$(BIN)/python scripts/walkthrough.py $(ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(ARGS)

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check mha_jax scripts tests

clean:
	rm -rf $(VENV) runs bench_out
