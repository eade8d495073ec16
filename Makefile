# The two README commands: `make demo` and `make test`. Both create .venv (torch 2.13.0
# CPU and the other dependencies), build the extension, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP_DEPS := $(VENV)/.deps-installed
STAMP_BUILD := $(VENV)/.hfquant-built
STAMP_PEFT := $(VENV)/.peft-installed
SOURCES := $(shell find csrc -type f 2>/dev/null) CMakeLists.txt pyproject.toml

.PHONY: all install demo test bench bench-quick bench-e2e bench-cuda cuda-check clean

all: install

$(STAMP_DEPS):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "transformers>=5.0" safetensors accelerate tqdm gguf pytest matplotlib \
	    scikit-build-core pybind11 ninja "cmake>=3.26" numpy
	touch $@

$(STAMP_BUILD): $(STAMP_DEPS) $(SOURCES)
	$(PIP) install -q --no-build-isolation -e .
	touch $@

# LoRA on quantized layers (tests/training); its own stamp so that existing venvs get it too
$(STAMP_PEFT): $(STAMP_DEPS)
	$(PIP) install -q peft
	touch $@

install: $(STAMP_BUILD) $(STAMP_PEFT)

demo: install
	$(PY) -m hfquant.demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_linear.py --write-docs

# peers for the end-to-end comparison (torchao 0.14 still has its CPU int4 layout)
bench-e2e: install
	$(PIP) install -q "torchao==0.14.1" optimum-quanto
	$(PY) benchmarks/bench_e2e.py --write-docs

bench-quick: install
	$(PY) benchmarks/bench_linear.py --quick

# Compiles every CUDA source (sm_80 + sm_90) on a machine without a GPU: a CUDA build of
# torch in .venv-cuda (several GB) and the machine's nvcc. Catches compile errors only;
# the CUDA tests and benchmarks need a GPU (tests/cuda, benchmarks/bench_cuda.py).
CUDA_VENV := .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_ARCHS ?= 8.0;9.0
NVCC ?= $(shell command -v nvcc || echo /usr/local/cuda/bin/nvcc)

$(CUDA_VENV)/.deps-installed:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q torch==2.14.1
	$(CUDA_PY) -m pip install -q scikit-build-core pybind11 ninja "cmake>=3.26" numpy
	touch $@

cuda-check: $(CUDA_VENV)/.deps-installed
	rm -rf build/cuda-check
	CUDACXX=$(NVCC) TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(CUDA_VENV)/bin/cmake -S . -B build/cuda-check -G Ninja \
	    -DPython_EXECUTABLE=$(abspath $(CUDA_PY)) -DHFQUANT_CUDA=ON -DSKBUILD_PROJECT_VERSION=0.0.0
	$(CUDA_VENV)/bin/cmake --build build/cuda-check -j
	$(CUDA_PY) -c "import sys; sys.path.insert(0, 'build/cuda-check'); import torch, _C; \
	    assert _C.cuda_built; print('CUDA build OK:', _C.__file__)"

# On a machine with a GPU: build with the CUDA kernels and run the CUDA benchmark.
bench-cuda:
	HFQUANT_CUDA=1 $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	$(PYTHON) benchmarks/bench_cuda.py

clean:
	rm -rf build $(VENV) .cache
