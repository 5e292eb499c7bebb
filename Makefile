# moetx developer commands. `make demo` and `make test` are the README's two commands.
PY ?= python3
PIP := $(PY) -m pip
# Test-suite timeout guard: the whole suite is budgeted at ~10 minutes on 2 cores.
PYTEST_ARGS ?=

.PHONY: setup demo lint typecheck test bench gpu-check

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

# GPU readiness (issue 17): the NCCL parity tests (one rank per GPU) and the benchmarks on CUDA.
# It fails first, installing and running nothing, without GPU_RANKS CUDA devices: MOETX_REQUIRE_GPU=1 also turns the
# tests' "needs CUDA devices" skips into failures, so it can never pass by skipping.
GPU_RANKS ?= 2
gpu-check:
	@$(PY) -c "import sys, torch; n = torch.cuda.device_count(); sys.exit(0 if n >= $(GPU_RANKS) else f'make gpu-check: FAILED: needs $(GPU_RANKS) CUDA devices (one NCCL rank per GPU), found {n} (torch {torch.__version__}, CUDA {torch.version.cuda}); nothing was run.')"
	@$(MAKE) --no-print-directory setup
	MOETX_REQUIRE_GPU=1 $(PY) -m pytest tests/test_gpu.py -v -rs -p no:cacheprovider
	$(PY) -m benchmarks.step_anatomy --backend nccl --ranks $(GPU_RANKS) --steps 9 --fsdp fsdp "fsdp(reshard_after_forward='auto', min_unit_bytes=1048576)"
	$(PY) -m benchmarks.overlap --backend nccl
