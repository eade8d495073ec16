"""The skinny CUDA qlinear kernel's addressing, checked without a GPU.

tools/emulate_cuda_skinny.py replays csrc/cuda/qlinear_skinny.cuh lane by lane in float64
(index arithmetic, shared-memory staging, weight decode, mma.m16n8k16 fragment layouts,
split-K) over the CUDA layout that hfquant.ref.repack_cuda_ref defines, and compares with
ref.qlinear_ref. A change of that layout which the kernel's addressing does not follow fails
here on a CPU; the kernel itself runs in test_qlinear.py (its cuda params) on a GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import emulate_cuda_skinny as emu  # noqa: E402


@pytest.mark.parametrize("case", [
    ((130, 1000), 64, True, 2, 0, False),   # chosen segments, several splits, asymmetric
    ((17, 300), 96, True, 33, 1, False),    # three m16 tiles, groups per packed word
    ((70, 160), -1, False, 7, 2, True),     # per channel, fp32 x (hi/lo split)
], ids=["g64-asym-M2", "g96-M33", "perchannel-f32"])
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_emulated_skinny_kernel_matches_ref(bits, case):
    (N, K), gs, asym, M, segs, f32 = case
    err, _, splits = emu.check_case(bits, N, K, gs, asym, M, segs, f32, torch.Generator().manual_seed(bits))
    assert err < 1e-5, f"relative error {err:.2e} (splits={splits})"
