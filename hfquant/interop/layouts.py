"""Tensor layouts of other quantized checkpoint formats, packed and unpacked in pure torch.

Codes are unsigned integers [N, K] (N = out_features, K = in_features) in the input
column order of the layer; each layout's docstring says how it stores them.

- GPTQ (AutoGPTQ / GPTQModel, ``checkpoint_format`` "gptq"): ``qweight`` int32
  [K * bits / 32, N], 32 / bits codes of one output column packed along K, code k of word
  i at bits ``bits * (k - i * 32 / bits)`` (least significant first); ``qzeros`` int32
  [G, N * bits / 32], zero points packed along N the same way and stored minus one
  ("gptq_v2" stores them as is); ``scales`` float16 [G, N]; ``g_idx`` int32 [K], the group
  of each input column. Weight = (code - zero) * scale.
- AWQ (AutoAWQ GEMM): ``qweight`` int32 [K, N / 8], eight codes of one input row packed
  along N in the order 0, 2, 4, 6, 1, 3, 5, 7 (nibble i holds column 8c + AWQ_ORDER[i]);
  ``qzeros`` int32 [G, N / 8] the same way (stored as is); ``scales`` float16 [G, N].
- compressed-tensors ``pack-quantized``: signed values q = code - 2^(bits-1) stored plus
  2^(bits-1) and packed densely along K, 32 / bits per int32 word, least significant
  first (``weight_packed`` int32 [N, ceil(K * bits / 32)]); zero points signed the same
  way, packed along N (``weight_zero_point`` int32 [ceil(N * bits / 32), G]).
"""
from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _per_word(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"hfquant: only 4- and 8-bit codes can be packed here, got bits={bits}")
    return 32 // bits


def pack_cols(codes: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unsigned codes [R, C] -> int32 [R, C * bits / 32]: word c of a row holds codes
    c * P .. c * P + P - 1 (P = 32 / bits), slot i (bits i*bits..) holding code
    c * P + order[i] (order defaults to 0..P-1). C must be a multiple of P."""
    P = _per_word(bits)
    R, C = codes.shape
    if C % P:
        raise ValueError(f"hfquant: cannot pack {C} values {P} to a word ({bits}-bit): not a multiple of {P}")
    c = codes.to(torch.int64).reshape(R, C // P, P)
    if order is not None:
        c = c[..., list(order)]
    shifts = torch.arange(P, dtype=torch.int64, device=codes.device) * bits
    words = (c << shifts).sum(-1)  # < 2^32, exact in int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_cols(words: torch.Tensor, bits: int, cols: int | None = None,
                order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of pack_cols: int32 [R, W] -> int32 codes [R, W * 32 / bits] (first ``cols``)."""
    if words.dtype != torch.int32:
        raise ValueError(f"hfquant: packed tensor must be int32, got {words.dtype}")
    P = _per_word(bits)
    R, W = words.shape
    shifts = torch.arange(P, dtype=torch.int64, device=words.device) * bits
    c = (words.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)  # [R, W, P]: slot i
    if order is not None:
        inv = [0] * P
        for slot, col in enumerate(order):
            inv[col] = slot
        c = c[..., inv]
    c = c.reshape(R, W * P).to(torch.int32)
    return c if cols is None else c[:, :cols]


# -- GPTQ -------------------------------------------------------------------------------
def gptq_pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] -> qweight int32 [K * bits / 32, N] (packed along K)."""
    return pack_cols(codes, bits).t().contiguous()


def gptq_unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight int32 [K * bits / 32, N] -> codes int32 [N, K]."""
    return unpack_cols(qweight.t().contiguous(), bits)


def gptq_pack_qzeros(zeros: torch.Tensor, bits: int, v1: bool = True) -> torch.Tensor:
    """zero points [N, G] -> qzeros int32 [G, N * bits / 32]; format v1 stores zero - 1."""
    z = zeros.to(torch.int64).t()
    if v1:
        if (z == 0).any():
            raise ValueError("zero point 0 cannot be stored in GPTQ checkpoint format v1 (it stores zero - 1)")
        z = z - 1
    return pack_cols(z, bits)


def gptq_unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, v1: bool = True) -> torch.Tensor:
    """qzeros int32 [G, N * bits / 32] -> zero points int32 [N, G]."""
    z = unpack_cols(qzeros, bits, out_features)
    if v1:
        z = z + 1
    return z.t().contiguous()


# -- AWQ (GEMM) -------------------------------------------------------------------------
def awq_pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] -> qweight int32 [K, N / 8] (packed along N, AWQ order)."""
    return pack_cols(codes.t().contiguous(), 4, AWQ_ORDER)


def awq_unpack_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K, N / 8] -> codes int32 [N, K]."""
    return unpack_cols(qweight, 4, order=AWQ_ORDER).t().contiguous()


def awq_pack_qzeros(zeros: torch.Tensor) -> torch.Tensor:
    """zero points [N, G] -> qzeros int32 [G, N / 8]."""
    return pack_cols(zeros.t().contiguous(), 4, AWQ_ORDER)


def awq_unpack_qzeros(qzeros: torch.Tensor, out_features: int) -> torch.Tensor:
    """qzeros int32 [G, N / 8] -> zero points int32 [N, G]."""
    return unpack_cols(qzeros, 4, out_features, order=AWQ_ORDER).t().contiguous()


# -- compressed-tensors pack-quantized ------------------------------------------------------
def ct_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [R, C] (= signed value + 2^(bits-1)) -> int32 [R, ceil(C * bits / 32)],
    packed along C; a partial last word is zero padded."""
    P = _per_word(bits)
    R, C = codes.shape
    pad = (-C) % P
    if pad:
        codes = torch.nn.functional.pad(codes.to(torch.int64), (0, pad))
    return pack_cols(codes, bits)


def ct_unpack(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 [R, W] -> unsigned codes int32 [R, cols]."""
    return unpack_cols(words, bits, cols)
