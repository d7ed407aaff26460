# One-command entry points. Each sets up .venv from scratch if needed (torch, build deps, the
# package with its compiled extension), then does its job.
#   make test    lint, compile every CUDA source with nvcc (when nvcc exists), run the tests
#   make bench   the benchmark: fused_optim against torch.optim (CSV + PNG under bench/results/)
#   make gpu-proof  on a GPU machine, with its own python3: build, tests, sanitizers, GPU bench
# TORCH_SPEC picks the torch build (default: the CPU-tested 2.13.0) and takes effect on an existing
# .venv too: the spec is recorded in .venv/.torch-spec, and a different one reinstalls torch and
# rebuilds the extension (scripts/venv_torch.sh). PYTHON picks the interpreter for a new .venv.
# BENCH_ARGS passes options to bench/bench_adam.py, e.g. BENCH_ARGS="--cases 2000x1000";
# BENCH_ADAFACTOR_ARGS to bench/bench_adafactor.py, BENCH_SMMF_ARGS to bench/bench_smmf.py.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BENCH_ARGS ?=
BENCH_ADAFACTOR_ARGS ?=
BENCH_SMMF_ARGS ?=
# Pinned so that `make lint` means the same everywhere; matplotlib draws the bench chart;
# transformers is an outside oracle of the Adafactor reference (tests only).
RUFF_VERSION := 0.17.6
CLANG_FORMAT_VERSION := 23.1.5
MATPLOTLIB_VERSION := 3.11.2
TRANSFORMERS_VERSION := 5.24.0
TOOLS := setuptools wheel ninja pytest numpy triton ruff==$(RUFF_VERSION) \
	clang-format==$(CLANG_FORMAT_VERSION) matplotlib==$(MATPLOTLIB_VERSION) \
	transformers==$(TRANSFORMERS_VERSION)
# The peers the bench times besides torch (not needed by the tests).
BENCH_TOOLS := adv-optm==2.5.16 pytorch_optimizer==4.1.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fused_optim-built
TORCH_RECORD := $(VENV)/.torch-spec
TOOLS_RECORD := $(VENV)/.tools
SOURCES := $(shell find csrc fused_optim triton_kernels -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) ! -name _build_info.py) setup.py pyproject.toml

.PHONY: setup test lint cuda-check pytest bench gpu-proof clean FORCE

setup: $(STAMP) $(TOOLS_RECORD)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first and pinned, so nothing installed after it can pull another (multi-GB CUDA) build.
# Runs every time; rewrites the record (and so triggers the rebuild) only when TORCH_SPEC changed.
$(TORCH_RECORD): $(PY) FORCE
	@bash scripts/venv_torch.sh $(PY) '$(TORCH_SPEC)' $@ $(STAMP)

$(TOOLS_RECORD): FORCE | $(TORCH_RECORD)
	@if [ "$$(cat $@ 2>/dev/null)" != "$(TOOLS)" ]; then \
		echo "tools: installing $(TOOLS)"; \
		$(PY) -m pip install -q $(TOOLS) && echo "$(TOOLS)" >$@; \
	fi

$(STAMP): $(TORCH_RECORD) $(SOURCES) | $(TOOLS_RECORD)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@$(PY) -c "import runpy; b = runpy.run_path('fused_optim/_build_info.py'); \
		print('fused_optim: built CPU' + (' + CUDA kernels for ' + b['CUDA_ARCHS'] if b['WITH_CUDA'] else ' kernels'), \
		'against torch', b['TORCH_VERSION'])"
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

# The CSV is named after the device the bench runs on (cuda if torch sees a GPU); the chart next to
# it. Fails if either step fails.
bench: setup
	@$(PY) -c "import matplotlib" 2>/dev/null || { echo "make bench: matplotlib is not importable in $(VENV) (needed for the chart)" >&2; exit 1; }
	@$(PY) -m pip install -q $(BENCH_TOOLS) || echo "make bench: could not install $(BENCH_TOOLS); those peers are skipped" >&2
	@dev=$$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')") && \
	csv=bench/results/bench_adam_$$dev.csv && \
	echo "$(PY) bench/bench_adam.py --csv $$csv $(BENCH_ARGS)" && \
	$(PY) bench/bench_adam.py --csv $$csv $(BENCH_ARGS) && \
	$(PY) bench/plot.py $$csv && \
	csv=bench/results/bench_adafactor_$$dev.csv && \
	echo "$(PY) bench/bench_adafactor.py --csv $$csv $(BENCH_ADAFACTOR_ARGS)" && \
	$(PY) bench/bench_adafactor.py --csv $$csv $(BENCH_ADAFACTOR_ARGS) && \
	$(PY) bench/plot.py $$csv && \
	csv=bench/results/bench_smmf_$$dev.csv && \
	echo "$(PY) bench/bench_smmf.py --csv $$csv $(BENCH_SMMF_ARGS)" && \
	$(PY) bench/bench_smmf.py --csv $$csv $(BENCH_SMMF_ARGS) && \
	$(PY) bench/plot.py $$csv

# A lent GPU machine (issue 10): its own python3 (torch with CUDA, no network), no .venv.
# STAGES: any of build, test, sanitize, bench; logs and results in $(GPU_OUT)/gpu_proof_*.tgz.
STAGES ?= build test
GPU_OUT ?= $(if $(OUT),$(OUT),/tmp/gpu_proof)
gpu-proof:
	OUT=$(GPU_OUT) PYTHON=$(PYTHON) bash scripts/gpu_proof.sh $(STAGES)

clean:
	rm -rf $(VENV) build *.egg-info fused_optim/*.so fused_optim/_build_info.py

FORCE:
