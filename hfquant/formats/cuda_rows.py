"""Rows of a weight held in the CUDA kernel layout, decoded with torch ops: the CUDA
implementation of ``hfquant::qembedding`` (registered for the CUDA dispatch key in
hfquant/ops.py). It gathers only the rows asked for, then decodes them; there is no fused
CUDA kernel for the lookup (it reads a few rows per token, far from any bandwidth limit).

The layout (written by ``hfquant::repack`` on a CUDA device, docs/formats.md):
packed_weight uint8 [Np, U * 64], each row cut into 64-byte segments of 128 (4-bit) or 64
(8-bit) codes, permuted inside a segment for the mma fragments; packed_scales float32
[G, P, Np]: plane 0 the scales, plane 1 (asymmetric only) the zero points.
"""
from __future__ import annotations

import torch

from .kernel_layouts import CUDA_SEG_BYTES as SEGMENT_BYTES
from .kernel_layouts import codes_from_cuda_layout, cuda_seg_k, group_geometry


def decode_rows(ids: torch.Tensor, packed_weight: torch.Tensor, packed_scales: torch.Tensor, bits: int,
                group_size: int, out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of the weight the CUDA-layout pair stands for, (v - z) * s in float32, cast
    to ``dtype``: [..., in_features]. Arguments are checked like the CPU kernel's."""
    name = "hfquant::qembedding"
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: ids must be int64 or int32, got {ids.dtype}")
    if bits not in (4, 8):
        raise ValueError(f"{name}: bits must be 4 or 8, got {bits}")
    if packed_weight.dtype != torch.uint8 or packed_weight.dim() != 2:
        raise ValueError(f"{name}: packed_weight must be uint8 [Np, bytes] (the CUDA layout), got "
                         f"{packed_weight.dtype} {list(packed_weight.shape)}")
    seg_k = cuda_seg_k(bits)
    Np, row_bytes = packed_weight.shape
    if row_bytes % SEGMENT_BYTES or Np < out_features or row_bytes // SEGMENT_BYTES * seg_k < in_features:
        raise ValueError(f"{name}: packed_weight {list(packed_weight.shape)} cannot hold a {out_features} x "
                         f"{in_features} {bits}-bit weight in the CUDA layout")
    gs, groups = group_geometry(group_size, in_features)
    if packed_scales.dtype != torch.float32 or packed_scales.dim() != 3 or packed_scales.shape[0] != groups \
            or packed_scales.shape[1] not in (1, 2) or packed_scales.shape[2] != Np:
        raise ValueError(f"{name}: packed_scales must be float32 [{groups}, 1 or 2, {Np}], got "
                         f"{packed_scales.dtype} {list(packed_scales.shape)}")
    flat = ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= out_features):
        bad = flat[(flat < 0) | (flat >= out_features)][0]
        raise ValueError(f"{name}: id {int(bad)} is out of range for {out_features} rows")
    codes = codes_from_cuda_layout(packed_weight[flat], bits)[:, :in_features]
    group = torch.arange(in_features, device=codes.device) // gs
    s = packed_scales[:, 0, flat].t()[:, group]
    if packed_scales.shape[1] == 2:
        z = packed_scales[:, 1, flat].t()[:, group]
    else:
        z = torch.full_like(s, 8.0 if bits == 4 else 128.0)  # symmetric codes are stored offset
    return ((codes.to(torch.float32) - z) * s).to(dtype).reshape(*ids.shape, in_features)
