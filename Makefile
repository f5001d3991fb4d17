# qwen-serve: two commands do all set-up on a fresh machine.
#   make serve   venv + install + stubs + kernels (if nvcc) + default model, then run the service
#   make test    the same set-up, then the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 50051
BACKEND ?= auto
PYTEST_ARGS ?=
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_SOURCES := $(wildcard cuda/*.cu)
CUDA_HEADERS := $(wildcard cuda/*.cuh)
FATBIN := cuda/build/qwen_kernels.fatbin
CUDA_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_86,code=sm_86 \
              -gencode arch=compute_89,code=sm_89 -gencode arch=compute_90,code=sm_90 \
              -gencode arch=compute_90,code=compute_90

.PHONY: serve test setup venv stubs kernels model cuda-extra clean bench-cpu gpu-suite

serve: setup
	$(VENV)/bin/qwen-serve serve --host $(HOST) --port $(PORT) --backend $(BACKEND)

# The suite also exercises the Node client and the C++/Go/Java stubs: their toolchains are set up here
# (non-fatal: what cannot be installed is skipped with a message, and its tests skip).
test: setup stubs-all node-deps
	$(PY) -m pytest $(PYTEST_ARGS)

setup: venv stubs kernels model cuda-extra

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]' --config-settings editable_mode=compat
	$(PIP) install -q -e clients/python --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

# Python stubs for the public API; stubs for other languages: `make -C clients stubs`.
qwen_serve/v1/generate_pb2.py: proto/qwen_serve/v1/generate.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. $<
	touch qwen_serve/__init__.py qwen_serve/v1/__init__.py

stubs: qwen_serve/v1/generate_pb2.py

# All kernels into one fatbin (sm_80..sm_90 + PTX). Skipped where nvcc is absent.
kernels:
	@if [ -z "$(NVCC)" ]; then echo "nvcc not found: skipping CUDA kernels (the cpu backend still works)"; \
	else $(MAKE) --no-print-directory $(FATBIN); fi

$(FATBIN): $(CUDA_SOURCES) $(CUDA_HEADERS)
	@mkdir -p cuda/build
	$(NVCC) --fatbin -O3 -std=c++17 --threads 0 $(CUDA_ARCHS) -o $@ cuda/all_kernels.cu

# PyCUDA has no wheel on PyPI: where a GPU is present, build it from source (needs nvcc + network).
cuda-extra: $(VENV)/.installed
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -c 'import pycuda' 2>/dev/null || $(PIP) install -q 'pycuda>=2024.1' \
	  || echo "warning: pycuda could not be installed; the service will use the cpu backend"; \
	fi

# Fetches and verifies the default model (skipped when already in the cache).
model: $(VENV)/.installed
	$(VENV)/bin/qwen-serve fetch-model

bench-cpu: setup
	$(PY) benchmarks/cpu_decode.py

clean:
	rm -rf $(VENV) qwen_serve cuda/build

# Other-language clients (issue 6): Debian toolchains + C++/Java/Go stubs, and the Node client's packages
# from its package-lock.json. Skips (with a message) what cannot be installed.
.PHONY: stubs-all node-deps
stubs-all:
	$(MAKE) -C clients deps
	$(MAKE) -C clients stubs

node-deps:
	@if command -v npm >/dev/null; then cd clients/node && npm ci --no-audit --no-fund; \
	else echo "npm not found: skipping the Node client's packages"; fi
