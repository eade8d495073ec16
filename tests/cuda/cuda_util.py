"""Shared by the CUDA tests: the skip condition (GPU, CUDA build, sm_80+) and small helpers."""
from __future__ import annotations

import pytest
import torch

from hfquant._ext import _C


def _usable() -> tuple[bool, str]:
    if not _C.cuda_built:
        return False, "hfquant was built without CUDA kernels"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, "the CUDA kernels need compute capability 8.0+"
    return True, ""


CUDA_OK, CUDA_WHY = _usable()
requires_cuda = pytest.mark.skipif(not CUDA_OK, reason=CUDA_WHY)


def equal_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaN where the other has NaN (any payload)."""
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)
