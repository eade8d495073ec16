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


def check_fwht_args(op: str, x: Tensor, signs: Tensor | None, mix: Tensor | None = None) -> None:
    if x.dim() < 1:
        raise ValueError(f"hfquant::{op}: x must have at least one dimension (the transformed one)")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hfquant::{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    n = x.shape[-1]
    m = 1
    if mix is not None:
        if mix.device != x.device:
            raise ValueError(f"hfquant::{op}: mix is on {mix.device}, x on {x.device}")
        if mix.dtype != torch.float32 or mix.dim() != 2 or mix.shape[0] != mix.shape[1] or mix.shape[0] < 1:
            raise ValueError(f"hfquant::{op}: mix must be a square float32 matrix [m, m], got {mix.dtype} "
                             f"{list(mix.shape)}")
        m = mix.shape[0]
        if n % m:
            raise ValueError(f"hfquant::{op}: the last dimension of x ({n}) is not a multiple of mix's order ({m})")
    p = n // m
    if p < 1 or p > 1 << 20 or p & (p - 1):
        what = "divided by mix's order must be" if mix is not None else "must be"
        raise ValueError(f"hfquant::{op}: the last dimension of x ({n}) {what} a power of two between 1 and "
                         f"{1 << 20} (other sizes: hfquant.algorithms.rotation.HadamardRotation)")
    if signs is not None:
        if signs.device != x.device:
            raise ValueError(f"hfquant::{op}: signs is on {signs.device}, x on {x.device}")
        if signs.dtype != torch.float32 or signs.dim() != 1 or signs.shape[0] != n:
            raise ValueError(f"hfquant::{op}: signs must be a float32 vector of {n} values (the last dimension of "
                             f"x), got {signs.dtype} {list(signs.shape)}")


def _mix(v: Tensor, mix: Tensor) -> Tensor:
    """out[..., i, :] = sum_j mix[i, j] v[..., j, :] over the sub-rows, the terms added in j's order
    (the kernel's order: a multiply, then a multiply and an add per term)."""
    acc = mix[:, 0, None] * v[..., 0:1, :]
    for j in range(1, mix.shape[0]):
        acc = acc + mix[:, j, None] * v[..., j:j + 1, :]
    return acc


def fwht(x: Tensor, signs: Tensor | None = None, inverse: bool = False, mix: Tensor | None = None) -> Tensor:
    """Forward: H (signs * x) / sqrt(p); inverse: signs * (H x) / sqrt(p), over the last dimension
    p (a power of two), computed in float32 and returned in x's dtype. With ``mix`` (float32
    [m, m]) the last dimension n = m p is m sub-rows of p: forward transforms each, then mixes
    them by mix; inverse mixes by mix^T, then transforms (the rotation (mix x H_p) of size n)."""
    check_fwht_args("hadamard_transform", x, signs, mix)
    n = x.shape[-1]
    m = 1 if mix is None else mix.shape[0]
    p = n // m
    lead = (*x.shape[:-1], m)
    v = x.to(torch.float32)
    if signs is not None and not inverse:
        v = v * signs
    v = v.reshape(lead + (p,))
    if mix is not None and inverse:
        v = _mix(v, mix.T)
    h = 1
    while h < p:
        pairs = v.reshape(*lead, p // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        v = torch.stack((a + b, a - b), dim=-2).reshape(*lead, p)
        h *= 2
    # 1 / sqrt(p) rounded as the kernel rounds it (float32 sqrt, then float32 division)
    v = v * (torch.ones((), dtype=torch.float32, device=v.device)
             / torch.sqrt(torch.full((), float(p), dtype=torch.float32, device=v.device)))
    if mix is not None and not inverse:
        v = _mix(v, mix)
    v = v.reshape(x.shape)
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
