# One-command entry points. Each sets up .venv from scratch if needed (torch, build deps, the
# package with its compiled extension), then does its job.
#   make test    lint, compile every CUDA source with nvcc (when nvcc exists), run the tests
#   make bench   the benchmark: fused_optim against torch.optim (CSV under bench/results/)
# TORCH_SPEC picks the torch build (default: the CPU-tested 2.13.0). PYTHON picks the interpreter.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fused_optim-built
SOURCES := $(shell find csrc fused_optim triton_kernels -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \)) setup.py pyproject.toml

.PHONY: setup test lint cuda-check pytest bench clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so nothing below can pull another (multi-GB CUDA) build
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q setuptools wheel ninja pytest numpy ruff triton clang-format==23.1.5

$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $$(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')

cuda-check: setup
	@if command -v nvcc >/dev/null 2>&1 || [ -x "$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then \
		PYTHON=$(PY) bash scripts/check_cuda_compile.sh; \
	else \
		echo "cuda-check: no nvcc on this machine; skipped (CI has one)"; \
	fi

# TRITON_INTERPRET=1 runs every Triton kernel on CPU tensors, so the triton backend is tested here too.
pytest: setup
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q

test: lint cuda-check pytest

bench: setup
	$(PY) bench/bench_adam.py

clean:
	rm -rf $(VENV) build *.egg-info fused_optim/*.so
