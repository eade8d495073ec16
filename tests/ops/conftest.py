import pytest

from hfquant._ext import _C


@pytest.fixture(params=_C.available_isas())
def isa(request):
    """Forces one kernel path for the test, then restores the one active before."""
    prev = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(prev)


@pytest.fixture(params=_C.available_int8_paths())
def i8path(request):
    """Forces one int8 GEMM kernel (and the activation-quantization row kernels it uses)."""
    _C.set_int8_path(request.param)
    yield request.param
    _C.set_int8_path("auto")
