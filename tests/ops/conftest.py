import contextlib

import pytest

import hfquant

from _devices import DEVICES
from hfquant._ext import _C

# The kernel paths of each device that a test taking `device` and one of these fixtures runs
# on (a test without `device` runs the CPU ones):
#   isa           CPU: every ISA this CPU runs; CUDA: the one set of kernels (None)
#   i8path        CPU: every int8 GEMM kernel; CUDA: the two int8 GEMM engines, cuBLASLt
#                 (heuristic algorithm, workspace) and at::_int_mm (_C.set_cuda_int8_lt)
#   qlinear_path  CPU: every ISA; CUDA: the mma.sync kernel for every M, the skinny split-K
#                 kernel for M <= 64 (mma above), dequantize + cuBLAS for every bf16/fp16 M
PATHS = {
    "isa": {"cpu": _C.available_isas(), "cuda": [None]},
    "i8path": {"cpu": _C.available_int8_paths(), "cuda": ["cublaslt", "int_mm"]},
    "qlinear_path": {"cpu": _C.available_isas(), "cuda": ["mma", "skinny", "cublas"]},
}


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    """`device` with a kernel-path fixture: each device with its own paths (ids cpu-avx2,
    cuda-mma, cuda), one parametrization in place of the two fixtures' params."""
    names = [n for n in PATHS if n in metafunc.fixturenames]
    if "device" not in metafunc.fixturenames or not names:
        return
    assert len(names) == 1, f"a test takes one kernel-path fixture, not {names}"
    params = [pytest.param(d.values[0], p, id=d.id if p is None else f"{d.id}-{p}", marks=d.marks)
              for d in DEVICES for p in PATHS[names[0]][d.values[0]]]
    # as a mark: pytest then leaves the fixtures' own params aside
    mark = pytest.mark.parametrize(("device", names[0]), params, indirect=True)
    metafunc.definition.add_marker(mark, append=False)  # first: ids read cpu-avx2-...


def _device(request) -> str:
    return request.getfixturevalue("device") if "device" in request.fixturenames else "cpu"


@contextlib.contextmanager
def _cpu_isa(name):
    with hfquant.settings(isa=name):  # restores the setting ("auto" or a forced path) on exit
        yield name


@pytest.fixture(params=PATHS["isa"]["cpu"])
def isa(request):
    """Forces one CPU kernel path for the test, then restores the one active before (CUDA: None)."""
    if _device(request) != "cpu":
        yield request.param
        return
    with _cpu_isa(request.param):
        yield request.param


@pytest.fixture(params=PATHS["i8path"]["cpu"])
def i8path(request):
    """Forces one int8 GEMM kernel (CPU: with the activation-quantization row kernels it uses;
    CUDA: the GEMM engine), then restores the default."""
    if _device(request) == "cpu":
        _C.set_int8_path(request.param)
        yield request.param
        _C.set_int8_path("auto")
        return
    prev = _C.cuda_int8_lt()
    _C.set_cuda_int8_lt(request.param == "cublaslt")
    yield request.param
    _C.set_cuda_int8_lt(prev)


@pytest.fixture
def cuda_switches():
    """_C, its CUDA qlinear switches (gemm_min_m, skinny_max_m, skinny_segs) restored after the test."""
    prev = (_C.cuda_gemm_min_m(), _C.cuda_skinny_max_m(), _C.cuda_skinny_segs())
    yield _C
    _C.set_cuda_gemm_min_m(prev[0])
    _C.set_cuda_skinny_max_m(prev[1])
    _C.set_cuda_skinny_segs(prev[2])


@pytest.fixture(params=PATHS["qlinear_path"]["cpu"])
def qlinear_path(request):
    """Forces one qlinear kernel path: on the CPU an ISA (as `isa`); on CUDA the mma.sync kernel
    for every M, or the skinny kernel for M <= 64 (the mma kernel above), or dequantize + cuBLAS
    for every bf16/fp16 M."""
    if _device(request) == "cpu":
        with _cpu_isa(request.param):
            yield request.param
        return
    switches = request.getfixturevalue("cuda_switches")
    switches.set_cuda_gemm_min_m(0 if request.param == "cublas" else 1 << 30)
    switches.set_cuda_skinny_max_m(64 if request.param == "skinny" else 0)
    switches.set_cuda_skinny_segs(0)
    yield request.param
