import pytest

from hfquant._ext import _C


@pytest.fixture(params=_C.available_isas())
def isa(request):
    """Forces one kernel path for the test, then restores the one active before."""
    prev = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(prev)
