# The two README commands: `make demo` and `make test`. Both create .venv (torch 2.13.0
# CPU and the other dependencies), build the extension, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP_DEPS := $(VENV)/.deps-installed
STAMP_BUILD := $(VENV)/.hfquant-built
SOURCES := $(shell find csrc -type f 2>/dev/null) CMakeLists.txt pyproject.toml

.PHONY: all install demo test bench bench-quick bench-e2e clean

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

install: $(STAMP_BUILD)

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

clean:
	rm -rf build $(VENV) .cache
