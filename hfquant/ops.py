"""Typed entry points to ``torch.ops.hfquant.*`` and their fake (meta) kernels.

The fake kernels let ``torch.compile`` trace the ops and let models be built on the meta
device. ``HFQUANT_BACKEND=ref`` routes the wrappers to the pure-torch twins in ref.py.
"""
from __future__ import annotations

import os

import torch

from . import _ext  # noqa: F401  (registers torch.ops.hfquant)
from . import ref

_NR = ref.NR


def _backend() -> str:
    return os.environ.get("HFQUANT_BACKEND", "native")


@torch.library.register_fake("hfquant::repack")
def _repack_fake(qweight, scales, zeros, bits, group_size, in_features):
    torch._check(bits in (4, 8), lambda: f"hfquant::repack: bits={bits} is not supported (use 4 or 8)")
    N = qweight.shape[0]
    gs, G = ref.group_geometry(group_size, in_features)
    Kp = ref._round_up(in_features, ref.K_ALIGN)
    T = -(-N // _NR)
    unit = 32 if bits == 4 else 16
    w = qweight.new_empty((T, Kp // unit, _NR, 16), dtype=torch.uint8)
    sb = scales.new_empty((T, G, 2, _NR), dtype=torch.float32)
    return w, sb


@torch.library.register_fake("hfquant::qlinear")
def _qlinear_fake(x, packed_weight, packed_scales, bias, bits, group_size, out_features, in_features):
    torch._check(x.shape[-1] == in_features,
                 lambda: f"hfquant::qlinear: x has last dimension {x.shape[-1]}, expected {in_features}")
    torch._check(x.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 lambda: f"hfquant::qlinear: x must be float32, bfloat16 or float16, got {x.dtype}")
    return x.new_empty((*x.shape[:-1], out_features))


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
           group_size: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical checkpoint tensors -> the kernel layout (docs/formats.md).

    qweight: 4-bit uint8 [N, ceil(K/2)]; 8-bit int8 [N, K] (symmetric) or uint8 [N, K] (asymmetric).
    scales: floating [N, G]; zeros: uint8 [N, G] or None (symmetric).
    Returns packed_weight uint8 [T, Kp/32 or Kp/16, 4, 16] and packed_scales float32 [T, G, 2, 4].
    """
    if _backend() == "ref":
        return ref.repack_ref(qweight, scales, zeros, bits, group_size, in_features)
    return torch.ops.hfquant.repack(qweight, scales, zeros, bits, group_size, in_features)


def qlinear(x: torch.Tensor, packed_weight: torch.Tensor, packed_scales: torch.Tensor,
            bias: torch.Tensor | None, bits: int, group_size: int, out_features: int,
            in_features: int) -> torch.Tensor:
    """y = x @ W^T + bias for W in the kernel layout; x float32/bfloat16/float16 [..., K]."""
    if _backend() == "ref":
        return ref.qlinear_ref(x, packed_weight, packed_scales, bias, bits, group_size, out_features,
                               in_features)
    return torch.ops.hfquant.qlinear(x, packed_weight, packed_scales, bias, bits, group_size, out_features,
                                     in_features)
