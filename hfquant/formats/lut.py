"""Checkpoint tensors of weight clustering (method "kmeans"), format version 1.

- ``qweight``: uint8 [N, ceil(K * bits / 8)], bits = 2, 3 or 4. Each row is a little-endian
  bit stream: index k occupies bits [bits * k, bits * k + bits) of the row, bit j of the
  stream being bit j % 8 of byte j // 8. So 4-bit: byte k // 2, low nibble for even k (as
  format v1); 2-bit: byte k // 4, bits 2 (k % 4); 3-bit: 8 indices in 3 bytes, index 0 in
  bits 0-2 of byte 0, index 2 in bits 6-7 of byte 0 and bit 0 of byte 1, ... Unused high
  bits of the last byte are zero.
- ``codebook``: [N, G, 2^bits] in the model's float dtype, G = ceil(K / group_size) (1 for
  group_size -1); row n, group g: the centroids, sorted ascending.
Weight[n, k] = codebook[n, k // group_size, index(n, k)].
"""
from __future__ import annotations

import torch

from .v1 import num_groups, pack_bits, packed_columns, unpack_bits

LUT_BITS = (2, 3, 4)


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices [N, K] (any integer dtype, 0 .. 2^bits - 1) -> uint8 [N, ceil(K * bits / 8)]."""
    if bits not in LUT_BITS:
        raise ValueError(f"pack_indices: bits={bits} is not supported (use one of {LUT_BITS})")
    return pack_bits(indices, bits)


def unpack_indices(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_indices: uint8 [N, ceil(K * bits / 8)] -> int64 indices [N, K]."""
    return unpack_bits(qweight, bits, in_features)


@torch.no_grad()
def dequantize_lut(qweight: torch.Tensor, codebook: torch.Tensor, bits: int, group_size: int, in_features: int,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Checkpoint tensors -> the float weight [N, K] they stand for."""
    idx = unpack_indices(qweight, bits, in_features)
    N = idx.shape[0]
    g = in_features if group_size == -1 else group_size
    gidx = (torch.arange(in_features, device=idx.device) // g).expand(N, -1)
    cb = codebook.to(torch.float32)
    w = cb[torch.arange(N, device=idx.device)[:, None], gidx, idx]
    return w.to(dtype or codebook.dtype)


def validate_lut(name: str, qweight: torch.Tensor, codebook: torch.Tensor, bits: int, group_size: int,
                 in_features: int, out_features: int) -> None:
    """Raises ValueError naming the tensor when loaded tensors do not fit the kmeans format."""
    G = num_groups(in_features, group_size)
    want_q = (out_features, packed_columns(in_features, bits))
    if tuple(qweight.shape) != want_q or qweight.dtype != torch.uint8:
        raise ValueError(
            f"hfquant: {name}.qweight has shape {tuple(qweight.shape)} and dtype {qweight.dtype}; "
            f"expected {want_q} torch.uint8 for kmeans bits={bits}, in_features={in_features}"
        )
    want_c = (out_features, G, 1 << bits)
    if tuple(codebook.shape) != want_c or not codebook.is_floating_point():
        raise ValueError(
            f"hfquant: {name}.codebook has shape {tuple(codebook.shape)} and dtype {codebook.dtype}; "
            f"expected {want_c} floating point for bits={bits}, group_size={group_size}"
        )
    if not torch.isfinite(codebook).all():
        raise ValueError(f"hfquant: {name}.codebook contains NaN or Inf")
    if in_features * bits % 8:
        # the unused high bits of each row's last byte must be zero (nothing else decodes there)
        used = in_features * bits % 8
        if (qweight[:, -1] >> used).any():
            raise ValueError(f"hfquant: {name}.qweight has nonzero padding bits after the last index of a row")
