"""Pure-torch forms of hfquant's elementwise transforms: the fast Walsh-Hadamard transform
and RMSNorm.

``fwht`` is the pure-torch form of ``hfquant::hadamard_transform`` (the same float32 operations
in the same order as the CPU kernel, so the two agree bit for bit): it serves devices without a
native kernel and is the op's twin in tests. Rotations of any size built on it:
``hfquant.algorithms.rotation.HadamardRotation``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_fwht_args(op: str, x: Tensor, signs: Tensor | None) -> None:
    if x.dim() < 1:
        raise ValueError(f"hfquant::{op}: x must have at least one dimension (the transformed one)")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hfquant::{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    p = x.shape[-1]
    if p < 1 or p > 1 << 20 or p & (p - 1):
        raise ValueError(f"hfquant::{op}: the last dimension of x ({p}) must be a power of two between 1 and "
                         f"{1 << 20} (other sizes: hfquant.algorithms.rotation.HadamardRotation)")
    if signs is not None:
        if signs.device != x.device:
            raise ValueError(f"hfquant::{op}: signs is on {signs.device}, x on {x.device}")
        if signs.dtype != torch.float32 or signs.dim() != 1 or signs.shape[0] != p:
            raise ValueError(f"hfquant::{op}: signs must be a float32 vector of {p} values (the last dimension of "
                             f"x), got {signs.dtype} {list(signs.shape)}")


def fwht(x: Tensor, signs: Tensor | None = None, inverse: bool = False) -> Tensor:
    """Forward: H (signs * x) / sqrt(p); inverse: signs * (H x) / sqrt(p), over the last dimension
    p (a power of two), computed in float32 and returned in x's dtype."""
    check_fwht_args("hadamard_transform", x, signs)
    p = x.shape[-1]
    lead = x.shape[:-1]
    v = x.to(torch.float32)
    if signs is not None and not inverse:
        v = v * signs
    h = 1
    while h < p:
        pairs = v.reshape(*lead, p // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        v = torch.stack((a + b, a - b), dim=-2).reshape(*lead, p)
        h *= 2
    # 1 / sqrt(p) rounded as the kernel rounds it (float32 sqrt, then float32 division)
    v = v * (torch.ones((), dtype=torch.float32, device=v.device)
             / torch.sqrt(torch.full((), float(p), dtype=torch.float32, device=v.device)))
    if signs is not None and inverse:
        v = v * signs
    return v.to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The RMSNorm of Llama-family decoders, as their modules compute it:
    ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` with the mean and rsqrt in float32
    (the pure-torch form of ``hfquant::rms_norm``)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
