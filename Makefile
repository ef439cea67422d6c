# fastlm: `make demo` runs the main job, `make test` the suite (both set up .venv from scratch).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NVCC := $(shell command -v nvcc 2>/dev/null || ( [ -x "$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && echo "$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ))
PYTEST_ARGS ?=

.PHONY: test demo bench lint cuda-check gpu-check install clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# a torch already importable (a GPU machine's own build) is kept; otherwise the pinned CPU-friendly one
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q setuptools wheel pybind11 ninja
	FASTLM_SKIP_CUDA_BUILD=1 $(PY) -m pip install -q --no-build-isolation -e ".[test,dev,model,hf]"
	touch $@

install: $(VENV)/.installed

# Build fastlm._C with nvcc (no GPU needed) and import it; a launch without a GPU returns an error code.
cuda-check: install
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: skipped: nvcc not found (PATH or CUDA_HOME); the CUDA backend is optional"; exit 0; fi; \
	PATH="$$(dirname $(NVCC)):$$PATH" $(PY) setup.py -q build_ext --inplace && $(PY) -m fastlm.cuda && $(PY) -m pytest tests/test_cuda_build.py -q -p no:cacheprovider

test: install
	@if [ -n "$(NVCC)" ]; then $(MAKE) --no-print-directory cuda-check; else echo "make test: cuda-check skipped: nvcc not found, fastlm._C not built"; fi
	$(PY) -m pytest tests -q -n 2 --durations=15 $(PYTEST_ARGS)

# The tiny GPT trained on this Python's own standard library (nothing downloaded), then sampled.
# --time-limit bounds the training on a slow machine; the checkpoint, metrics.jsonl and loss.png land in out/demo.
demo: install
	$(PY) -m fastlm info
	$(PY) -m fastlm train --preset tiny --steps 1000 --batch-size 8 --lr 3e-3 --warmup 30 --eval-interval 100 --time-limit 180 --out out/demo
	$(PY) -m fastlm generate --checkpoint out/demo --prompt "def " --max-new-tokens 120 --temperature 0.8 --seed 0

bench: install
	mkdir -p benchmarks/results
	$(PY) -m fastlm bench all --json benchmarks/results/latest.json --plot benchmarks/results/latest.png

lint: install
	$(PY) -m ruff check fastlm tests benchmarks

# On a GPU machine, with its own torch: build for sm_90a, test both backends, sanitize, benchmark.
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf build fastlm/_C*.so *.egg-info
