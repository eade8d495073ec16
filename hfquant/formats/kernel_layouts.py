"""Facts of the kernel layouts (docs/formats.md, "Kernel layout"): their constants, group
geometry and the exact unpacking of a layout back to codes and checkpoint tensors (what
save, to_linear and the qlinear backward need). The layouts are written by the layout ops
(``hfquant::repack``, ``int8_pack``, ``lut_repack``); their pure-torch twins in
hfquant/ref.py are built on these same functions.
"""
from __future__ import annotations

import functools

import torch

from .lut import pack_indices
from .v1 import pack_int4

# --- qlinear, CPU layout: packed_weight uint8 [T, U, NR, 16], packed_scales float32 [T, G, 2, NR]
NR = 4  # rows per tile of the CPU kernel layout
K_ALIGN = 32  # k of the CPU layout padded to a multiple of this


def round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def group_geometry(group_size: int, in_features: int) -> tuple[int, int]:
    """(group length in k, number of groups) of the kernel layout; per channel = one group."""
    if group_size == -1:
        return round_up(in_features, K_ALIGN), 1
    return group_size, -(-in_features // group_size)


def codes_from_packed(packed_weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Kernel layout -> unsigned codes v [rows, Kp] (int32), rows and k in natural order.

    Takes the CPU layout (4-D) and the CUDA layout (2-D)."""
    if packed_weight.dim() == 2:
        return codes_from_cuda_layout(packed_weight, bits)
    T = packed_weight.shape[0]
    w = packed_weight.to(torch.int32)
    if bits == 4:
        v = torch.stack([w & 0x0F, w >> 4], dim=3)  # [T, U, 4, 2, 16]
        return v.permute(0, 2, 1, 3, 4).reshape(T * NR, -1)
    return w.permute(0, 2, 1, 3).reshape(T * NR, -1)


# --- qlinear, CUDA layout (csrc/cuda/qlinear_layout.cuh): packed_weight uint8 [Np, U * 64],
# packed_scales float32 [G, P, Np] (plane 0 the scales, plane 1 the zero points, asymmetric only)
CUDA_ROW_PAD = 64  # rows padded to a multiple of this
CUDA_SEG_BYTES = 64  # one 16-byte load per lane t of 4: a row segment


def cuda_seg_k(bits: int) -> int:
    """k per 64-byte row segment of the CUDA layout: 128 (4-bit) or 64 (8-bit)."""
    return 128 if bits == 4 else 64


@functools.lru_cache(maxsize=None)
def cuda_code_positions(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For k = 0..seg_k-1 of a segment: (byte in the segment, bit shift) of its code.

    Lane t (0..3) of a quad loads bytes 16t..16t+15 of the segment; its 32-bit word j holds
    the codes of k = 32j + r (4-bit: 8 nibbles) or 16j + r (8-bit: 4 bytes) for the r that
    the mma.m16n8k16 B fragment gives that lane. The tensors are shared: do not modify them."""
    kk = torch.arange(cuda_seg_k(bits))
    if bits == 4:
        j, r = kk // 32, kk % 32
        t, p = (r % 8) // 2, r // 8 + 4 * (r % 2)
        return 16 * t + 4 * j + p // 2, 4 * (p % 2)
    j, r = kk // 16, kk % 16
    t, b = (r % 8) // 2, r % 2 + 2 * (r // 8)
    return 16 * t + 4 * j + b, torch.zeros_like(kk)


def codes_from_cuda_layout(packed_weight: torch.Tensor, bits: int) -> torch.Tensor:
    """CUDA layout rows uint8 [n, U * 64] -> unsigned codes int32 [n, U * seg_k]."""
    Np, ldw = packed_weight.shape
    U = ldw // CUDA_SEG_BYTES
    byte, shift = (t.to(packed_weight.device) for t in cuda_code_positions(bits))
    seg = packed_weight.to(torch.int32).reshape(Np, U, CUDA_SEG_BYTES)
    v = (seg[..., byte] >> shift) & ((1 << bits) - 1)  # [Np, U, seg_k]
    return v.reshape(Np, U * cuda_seg_k(bits))


def qweight_from_packed(packed_weight: torch.Tensor, bits: int, out_features: int, in_features: int,
                        symmetric: bool) -> torch.Tensor:
    """Canonical qweight rebuilt exactly from the kernel layout (a pure permutation)."""
    v = codes_from_packed(packed_weight, bits)[:out_features, :in_features]
    if bits == 4:
        return pack_int4(v).contiguous()
    if symmetric:
        return (v - 128).to(torch.int8).contiguous()
    return v.to(torch.uint8).contiguous()


def dequantize_packed(packed_weight, packed_scales, bits: int, group_size: int, out_features: int,
                      in_features: int) -> torch.Tensor:
    """The float32 weight [N, K] that a packed pair (CPU or CUDA layout) stands for: (v - z) * s."""
    K = in_features
    gs, G = group_geometry(group_size, K)
    v = codes_from_packed(packed_weight, bits)
    Kp = v.shape[1]
    gidx = torch.clamp(torch.arange(Kp, device=v.device) // gs, max=G - 1)
    if packed_weight.dim() == 2:  # CUDA layout: [G, P, Np]
        s = packed_scales[:, 0, :].t()
        if packed_scales.shape[1] == 2:
            z = packed_scales[:, 1, :].t()
        else:
            z = torch.full_like(s, 8.0 if bits == 4 else 128.0)
        wf = (v.to(torch.float32) - z[:, gidx]) * s[:, gidx]
        return wf[:out_features, :K]
    T = packed_weight.shape[0]
    sb = packed_scales.permute(0, 3, 1, 2).reshape(T * NR, G, 2)  # [Np, G, 2]
    off = 128.0 if bits == 4 else 0.0
    s = sb[..., 0]
    sz = sb[..., 1] - off * s  # s * z
    wf = v.to(torch.float32) * s[:, gidx] - sz[:, gidx]
    return wf[:out_features, :K]


# --- int8 activations: CPU packed int8 [Nt, K4, I8_TILE, I8_KG]; CUDA row-major, zero padded
I8_TILE = 16  # output channels per tile of the int8 GEMM layout
I8_KG = 4  # k per 32-bit lane
I8_CUDA_PAD = 16  # the CUDA int8 layout pads N and K to multiples of this


def int8_weight_from_packed(packed_weight: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """int8 [N, K] weights rebuilt exactly from the int8 GEMM layout (CPU 4-D or CUDA 2-D)."""
    if packed_weight.dim() == 2:  # CUDA: row-major W zero padded to [round_up(N, 16), round_up(K, 16)]
        return packed_weight[:out_features, :in_features].contiguous()
    Nt, K4 = packed_weight.shape[:2]
    w = packed_weight.permute(0, 2, 1, 3).reshape(Nt * I8_TILE, K4 * I8_KG)
    return w[:out_features, :in_features].contiguous()


# --- weight clustering (LUT kernel, csrc/cpu/lut_linear.h): indices uint8 [N, Kp/2], table fp32 [N, G, 16]
LUT_UNIT_K = 32  # k per 16-byte unit of a row of the kernel layout
LUT_TABLE = 16  # table entries per (row, group)


def lut_group_geometry(group_size: int, in_features: int) -> tuple[int, int]:
    """(group length in k, groups per row) of the LUT layout; one codebook per row = one group."""
    if group_size == -1:
        return round_up(in_features, LUT_UNIT_K), 1
    return group_size, -(-in_features // group_size)


def lut_indices_from_packed(packed_indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """Kernel layout -> indices int64 [N, K] (a permutation of nibbles)."""
    N = packed_indices.shape[0]
    w = packed_indices.to(torch.int64).reshape(N, -1, 16)
    return torch.stack([w & 0x0F, w >> 4], dim=2).reshape(N, -1)[:, :in_features]


def lut_qweight_from_packed(packed_indices: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The canonical qweight rebuilt exactly from the kernel layout."""
    return pack_indices(lut_indices_from_packed(packed_indices, in_features), bits)
