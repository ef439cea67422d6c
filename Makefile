# fastlm: `make demo` runs the main job, `make test` the suite (both set up .venv from scratch).
# `make test` first builds in place (`make host-build`: one CMake build through setup.py)
# fastlm._C_host, csrc compiled for the CPU by the host C++ compiler, and, where nvcc is found,
# fastlm._C, csrc through nvcc; `make clean` removes both.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NVCC := $(shell command -v nvcc 2>/dev/null || ( [ -x "$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && echo "$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ))
PYTEST_ARGS ?=

.PHONY: test demo bench lint host-build cuda-check gpu-check install clean static-check static-report

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# a torch already importable (a GPU machine's own build) is kept; otherwise the pinned CPU-friendly one
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q setuptools wheel pybind11 ninja
	FASTLM_SKIP_CUDA_BUILD=1 FASTLM_SKIP_HOST_BUILD=1 $(PY) -m pip install -q --no-build-isolation -e ".[test,dev,model,hf]"
	touch $@

install: $(VENV)/.installed

# Build in place fastlm._C_host (needs cmake and a C++ compiler, no nvcc) and, with nvcc found, fastlm._C:
# one CMake build, so cuda-check finds both up to date. FASTLM_SKIP_{HOST,CUDA}_BUILD=1 leaves one out.
host-build: install
	$(if $(NVCC),PATH="$$(dirname $(NVCC)):$$PATH",FASTLM_SKIP_CUDA_BUILD=1) $(PY) setup.py -q build_ext --inplace

# Build fastlm._C with nvcc (no GPU needed) and import it; a launch without a GPU returns an error code.
cuda-check: host-build
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: skipped: nvcc not found (PATH or CUDA_HOME), fastlm._C not built; the CUDA backend is optional"; exit 0; fi; \
	$(PY) -m fastlm.cuda && $(PY) -m pytest tests/test_cuda_build.py -q -p no:cacheprovider

test: cuda-check
	@# cuda-check runs tests/test_cuda_build.py after the build; the suite below then leaves it out
	$(PY) -m pytest tests -q -n 2 --durations=15 $(if $(NVCC),--ignore=tests/test_cuda_build.py) $(PYTEST_ARGS)

# The tiny GPT trained on this Python's own standard library (nothing downloaded), then sampled.
# First a few interpreter cases of the Triton kernels the model would run on a GPU. The training
# runs on the backend it prints (on a CPU: the plain-PyTorch reference); --fit-time-limit runs the
# warm-up and cosine decay on the elapsed share of --time-limit when that is ahead of the steps, so
# the schedule completes in 120 s however slow the machine. The checkpoint, metrics.jsonl and
# loss.png land in out/demo (replaced on each run).
demo: install
	$(PY) -m fastlm info
	$(PY) -m fastlm check layer_norm attention decode_attention sample --device cpu --max-cases 3
	$(PY) -m fastlm train --preset tiny --steps 1000 --batch-size 8 --lr 3e-3 --warmup 30 --eval-interval 50 --time-limit 120 --fit-time-limit --overwrite --out out/demo
	$(PY) -m fastlm generate --checkpoint out/demo --prompt "def " --max-new-tokens 120 --temperature 0.8 --seed 0

bench: install
	mkdir -p benchmarks/results
	$(PY) -m fastlm bench all --json benchmarks/results/latest.json --plot benchmarks/results/latest.png

lint: install
	$(PY) -m ruff check fastlm tests benchmarks

# The compile tier without a GPU (make test checks every default config): every autotune candidate and
# the full product of sizes, dtypes and flags, gated (slow: about an hour on 2 cores).
static-check: install
	env -u TRITON_INTERPRET $(PY) -m fastlm.audit --all-configs --check --quiet --jobs 2 --json benchmarks/static/exhaustive.json

# Regenerate the committed reports benchmarks/static/sm_90a.md / sm_80.md (+ .json): default configs and csrc.
static-report: cuda-check
	env -u TRITON_INTERPRET $(PY) -m fastlm.audit --quiet --jobs 2 --write-reports benchmarks/static

# On a GPU machine, with its own torch: build for sm_90a, test both backends, sanitize, benchmark.
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf build fastlm/_C.*.so fastlm/_C_host.*.so *.egg-info
