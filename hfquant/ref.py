"""Pure-torch twins of every native op: the documented semantics and the test oracle.

Each function has the same signature as ``torch.ops.hfquant.<op>``. They are also an
explicit backend (``HFQUANT_BACKEND=ref``), never a silent fallback.
"""
from __future__ import annotations

import torch

from .formats.v1 import pack_int4, unpack_int4

NR = 4  # rows per tile of the kernel layout
K_ALIGN = 32


def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def group_geometry(group_size: int, in_features: int) -> tuple[int, int]:
    """(group length in k, number of groups) of the kernel layout; per channel = one group."""
    if group_size == -1:
        return _round_up(in_features, K_ALIGN), 1
    return group_size, -(-in_features // group_size)


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int, asymmetric: bool) -> torch.Tensor:
    """Canonical qweight -> unsigned codes v as int32 [N, K] (4-bit 0..15, 8-bit 0..255)."""
    if bits == 4:
        return unpack_int4(qweight, in_features).to(torch.int32)
    if asymmetric:
        return qweight.to(torch.int32)
    return qweight.to(torch.int32) + 128


def codes_from_packed(packed_weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Kernel layout -> unsigned codes v [T*4, Kp] (int32), rows and k in natural order."""
    T = packed_weight.shape[0]
    w = packed_weight.to(torch.int32)
    if bits == 4:
        v = torch.stack([w & 0x0F, w >> 4], dim=3)  # [T, U, 4, 2, 16]
        return v.permute(0, 2, 1, 3, 4).reshape(T * NR, -1)
    return w.permute(0, 2, 1, 3).reshape(T * NR, -1)


def qweight_from_packed(packed_weight: torch.Tensor, bits: int, out_features: int, in_features: int,
                        symmetric: bool) -> torch.Tensor:
    """Canonical qweight rebuilt exactly from the kernel layout (a pure permutation)."""
    v = codes_from_packed(packed_weight, bits)[:out_features, :in_features]
    if bits == 4:
        return pack_int4(v).contiguous()
    if symmetric:
        return (v - 128).to(torch.int8).contiguous()
    return v.to(torch.uint8).contiguous()


def repack_ref(qweight, scales, zeros, bits: int, group_size: int, in_features: int):
    """Twin of ``hfquant::repack``: canonical tensors -> (packed_weight, packed_scales)."""
    K = in_features
    N = qweight.shape[0]
    gs, G = group_geometry(group_size, K)
    Kp = _round_up(K, K_ALIGN)
    T = -(-N // NR)
    v = unpack_codes(qweight, bits, K, zeros is not None)
    vp = torch.zeros(T * NR, Kp, dtype=torch.int32)
    vp[:N, :K] = v
    if bits == 4:
        # [T, 4, U, 2, 16] -> byte = low | high << 4, arranged [T, U, 4, 16]
        u = vp.reshape(T, NR, Kp // 32, 2, 16)
        byte = u[:, :, :, 0, :] | (u[:, :, :, 1, :] << 4)
        w = byte.permute(0, 2, 1, 3).contiguous().to(torch.uint8)
    else:
        w = vp.reshape(T, NR, Kp // 16, 16).permute(0, 2, 1, 3).contiguous().to(torch.uint8)
    s = scales.to(torch.float32)
    if zeros is None:
        z = torch.full_like(s, 8.0 if bits == 4 else 128.0)
    else:
        z = zeros.to(torch.float32)
    off = 128.0 if bits == 4 else 0.0
    sb = torch.zeros(T * NR, G, 2, dtype=torch.float32)
    sb[:N, :, 0] = s
    sb[:N, :, 1] = s * (z + off)
    sb = sb.reshape(T, NR, G, 2).permute(0, 2, 3, 1).contiguous()
    return w, sb


def dequantize_packed_ref(packed_weight, packed_scales, bits: int, group_size: int, out_features: int,
                          in_features: int) -> torch.Tensor:
    """The float32 weight [N, K] that a packed pair stands for: (v - z) * s."""
    T = packed_weight.shape[0]
    K = in_features
    Kp = _round_up(K, K_ALIGN)
    gs, G = group_geometry(group_size, K)
    v = codes_from_packed(packed_weight, bits)
    sb = packed_scales.permute(0, 3, 1, 2).reshape(T * NR, G, 2)  # [Np, G, 2]
    off = 128.0 if bits == 4 else 0.0
    s = sb[..., 0]
    sz = sb[..., 1] - off * s  # s * z
    gidx = torch.clamp(torch.arange(Kp) // gs, max=G - 1)
    wf = v.to(torch.float32) * s[:, gidx] - sz[:, gidx]
    return wf[:out_features, :K]


def qlinear_ref(x, packed_weight, packed_scales, bias, bits: int, group_size: int, out_features: int,
                in_features: int) -> torch.Tensor:
    """Twin of ``hfquant::qlinear``: x @ dequant(W)^T + bias, accumulated in float64."""
    w = dequantize_packed_ref(packed_weight, packed_scales, bits, group_size, out_features, in_features)
    y = x.to(torch.float64) @ w.to(torch.float64).t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)
