# moetx developer commands. `make demo` and `make test` are the README's two commands.
PY ?= python3
PIP := $(PY) -m pip
# Test-suite timeout guard: the whole suite is budgeted at ~10 minutes on 2 cores.
PYTEST_ARGS ?=

.PHONY: setup demo lint typecheck test bench

# Install the pinned CPU torch wheel first unless a torch is already importable (a GPU machine
# keeps its own build): a bare `torch` requirement would pull a multi-GB CUDA build.
setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	@$(PIP) install -q -e ".[dev,hf]"

demo: setup
	$(PY) -m moetx demo

lint:
	$(PY) -m ruff check moetx tests benchmarks
	$(PY) -m ruff format --check moetx tests benchmarks

typecheck:
	$(PY) -m mypy moetx

test: setup lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.run_all
