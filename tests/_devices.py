"""The devices the tests run on: the CPU always, CUDA where a usable GPU is present.

``requires_cuda`` / ``requires_sm(80)`` mark a test (or a ``device`` param) as needing a GPU
of that compute capability and hfquant built with CUDA kernels; without one, the test is
collected and skipped with the reason (tests/conftest.py). ``pytest -m cuda`` selects them.
"""
from __future__ import annotations

import functools

import pytest
import torch


@functools.cache
def cuda_skip_reason(sm: int = 80) -> str | None:
    """Why the CUDA tests cannot run here (None: they can). ``sm``: the compute capability
    the test needs, 80 for 8.0 (every hfquant CUDA kernel)."""
    from hfquant._ext import _C

    if not _C.cuda_built:
        return "CUDA: hfquant was built without CUDA kernels"
    if not torch.cuda.is_available():
        return "CUDA: no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major * 10 + minor < sm:
        return f"CUDA: needs compute capability {sm // 10}.{sm % 10}+, the GPU has {major}.{minor}"
    return None


def requires_sm(sm: int) -> pytest.MarkDecorator:
    """Marks a test as needing a CUDA GPU of compute capability ``sm`` (80: 8.0) or newer."""
    return pytest.mark.cuda(sm=sm)


# every hfquant CUDA kernel needs sm_80 (mma.sync bf16, cp.async)
requires_cuda = requires_sm(80)

# the params of the `device` fixture
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]
