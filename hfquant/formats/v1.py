"""Checkpoint format version 1: canonical, device-independent quantized tensors.

- ``qweight``: 8-bit symmetric int8 [N, K] (-127..127); 8-bit asymmetric uint8 [N, K];
  4-bit uint8 [N, ceil(K/2)], element k of a row in byte k//2, low nibble for even k;
  3-bit and 2-bit uint8 [N, ceil(K * bits / 8)], each row a little-endian bit stream
  (code k in bits [bits*k, bits*k + bits) of the row, stream bit j = bit j % 8 of byte
  j // 8; so 2-bit: byte k // 4, bits 2 (k % 4); unused high bits of the last byte zero).
  The 4-bit layout is the same bit stream with bits = 4.
  Symmetric b-bit codes (b < 8) are the values offset by 2^(b-1) (4-bit: 0..15, value + 8),
  asymmetric codes 0..2^b - 1.
- ``scales``: [N, G] in the model's float dtype, G = ceil(K / group_size) (1 per channel).
- ``zeros``: uint8 [N, G], asymmetric with integer zero points only (0..2^b - 1).
- ``offsets``: [N, G] in the scales' dtype, asymmetric with float offsets only (format
  version 2, ``zero_point="float"``): weight = code * scale + offset, codes 0..2^b - 1 (the
  grid of GGUF's Q4_1; nothing forces 0 onto it).
Weight = (code - zero) * scale, with zero = 2^(b-1) (b < 8) / 0 (8-bit int8) when symmetric.
Symmetric scales are >= 0 on the "range" grid; the "extreme" and "best" grids (format
version 2) may store a negative scale, which puts a group's largest-magnitude weight on the
lowest code -2^(b-1) whatever its sign (GGUF's Q4_0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    offsets: torch.Tensor | None = None


# How the symmetric grid is placed on a group (bits < 8): "range" spans the group without
# clipping (scale >= 0); "extreme" puts the largest-magnitude weight on code -2^(b-1) with a
# signed scale (the other side may clip at 2^(b-1) - 1); "best" takes, per group, whichever of
# the two has the smaller squared error.
GRIDS = ("range", "extreme", "best")
# The zero point of an asymmetric grid: an integer code, or a float offset (the group minimum).
ZERO_POINTS = ("integer", "float")

SUPPORTED_BITS = (2, 3, 4, 8)
# bits stored as a bit stream of codes (pack_bits); 4-bit is the nibble layout, the same stream
STREAM_BITS = (2, 3, 4)


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] -> uint8 [N, ceil(K/2)], low nibble = even k."""
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N, ceil(K/2)] -> uint8 codes [N, K]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


def packed_columns(in_features: int, bits: int) -> int:
    """Bytes per row of a bit-stream packed row of ``in_features`` codes."""
    return -(-in_features * bits // 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [N, K] (any integer dtype, 0 .. 2^bits - 1) -> uint8 [N, ceil(K * bits / 8)],
    each row a little-endian bit stream (8 codes = ``bits`` bytes)."""
    if bits not in STREAM_BITS:
        raise ValueError(f"pack_bits: bits={bits} is not supported (use one of {STREAM_BITS})")
    N, K = codes.shape
    K8 = -(-K // 8) * 8
    v = torch.nn.functional.pad(codes.to(torch.int64), (0, K8 - K)).reshape(N, K8 // 8, 8)
    word = (v << (bits * torch.arange(8, device=v.device))).sum(-1)  # [N, K8/8]
    out = (word[..., None] >> (8 * torch.arange(bits, device=v.device))) & 0xFF  # [N, K8/8, bits]
    return out.reshape(N, -1)[:, :packed_columns(K, bits)].to(torch.uint8).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [N, ceil(K * bits / 8)] -> int64 codes [N, K]."""
    N = packed.shape[0]
    K8 = -(-in_features // 8) * 8
    b = torch.nn.functional.pad(packed.to(torch.int64), (0, K8 * bits // 8 - packed.shape[1]))
    word = (b.reshape(N, K8 // 8, bits) << (8 * torch.arange(bits, device=b.device))).sum(-1)
    v = (word[..., None] >> (bits * torch.arange(8, device=b.device))) & ((1 << bits) - 1)
    return v.reshape(N, K8)[:, :in_features]


def symmetric_zero(bits: int) -> int:
    """The implicit zero code of a symmetric scheme: 2^(bits-1) below 8 bits, 0 for int8."""
    return 0 if bits == 8 else 1 << (bits - 1)


def grouped(w: torch.Tensor, group_size: int, edge: bool = False) -> torch.Tensor:
    """[N, K] -> [N, G, g] with the ragged last group zero padded (``edge``: padded with the
    row's last weight, so that the padding leaves the group's range unchanged)."""
    N, K = w.shape
    g = K if group_size == -1 else group_size
    G = -(-K // g)
    if G * g != K:
        if edge:
            w = torch.cat([w, w[:, -1:].expand(N, G * g - K)], dim=1)
        else:
            w = torch.nn.functional.pad(w, (0, G * g - K))
    return w.reshape(N, G, g)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(lowest, highest) stored code: symmetric b-bit (b < 8) 0..2^b - 1 (value + 2^(b-1)),
    symmetric 8-bit -127..127 (the value itself), asymmetric 0..2^bits - 1."""
    if symmetric and bits == 8:
        return -127, 127
    return 0, (1 << bits) - 1


@torch.no_grad()
def group_params(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype,
                 clip: torch.Tensor | float = 1.0, grid: str = "range") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero code of each group of ``w`` [..., g] (float32): (s [...], z [...]),
    both float32, s already rounded to ``scale_dtype``. A weight is stored as
    clamp(round(w / s) + z, *code_range) and stands for (code - z) * s.

    Symmetric b < 8 bits: the codes stand for -h .. h - 1 (h = 2^(b-1)), z = h. ``grid``
    "range": s is the smallest step whose grid holds the group's range,
    s = max(-min(w) / h, max(w) / (h - 1)); no weight is clipped. "extreme": s = e / -h with e
    the group's weight of largest magnitude, signed, so e lands on the lowest code and the
    other side may clip (GGUF's Q4_0). "best": per group, the one of the two with the smaller
    squared error. Their effect on perplexity: docs/accuracy.md, defaults-validation.
    Symmetric 8-bit: s = max|w| / 127, codes -127..127, z = 0 (``grid`` does not apply).
    Asymmetric: the range [min(w, 0), max(w, 0)] spread over 2^bits - 1 steps, z = round(-min / s)
    (``offset_params`` gives the float-offset grid instead).
    ``clip`` (a factor in (0, 1], scalar or per group) shrinks that range first (the
    clipping searches of GPTQ and AWQ)."""
    if grid not in GRIDS:
        raise ValueError(f"hfquant: grid={grid!r} is not supported (use one of {GRIDS})")
    w = w.to(torch.float32)
    if symmetric and bits >= 8:
        s = (w.abs().amax(dim=-1) * clip / 127).to(scale_dtype).to(torch.float32)
        return s, torch.zeros_like(s)
    if symmetric:
        h = 1 << (bits - 1)
        z = torch.full(w.shape[:-1], float(symmetric_zero(bits)), dtype=torch.float32, device=w.device)
        if grid == "range":
            return _range_scale(w, h, scale_dtype, clip), z
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        e = torch.where(-lo > hi, lo, hi) * clip
        s_ext = (e / -h).to(scale_dtype).to(torch.float32)
        if grid == "extreme":
            return s_ext, z
        s_rng = _range_scale(w, h, scale_dtype, clip)
        err = [((quantize_codes(w, c, z, bits, True) - z[..., None]) * c[..., None] - w).square().sum(-1)
               for c in (s_rng, s_ext)]
        return torch.where(err[1] < err[0], s_ext, s_rng), z
    qmax = (1 << bits) - 1
    lo = torch.clamp(w.amin(dim=-1), max=0.0) * clip
    hi = torch.clamp(w.amax(dim=-1), min=0.0) * clip
    s = ((hi - lo) / qmax).to(scale_dtype).to(torch.float32)
    z = torch.clamp(torch.round(-lo / torch.where(s > 0, s, torch.ones_like(s))), 0, qmax)
    return s, z


def _range_scale(w: torch.Tensor, h: int, scale_dtype, clip) -> torch.Tensor:
    neg, pos = -w.amin(dim=-1).clamp(max=0.0) * clip, w.amax(dim=-1).clamp(min=0.0) * clip
    return torch.maximum(neg / h, pos / (h - 1)).to(scale_dtype).to(torch.float32)


@torch.no_grad()
def offset_params(w: torch.Tensor, bits: int, scale_dtype: torch.dtype,
                  clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and float offset of each group of ``w`` [..., g] for the asymmetric grid with a
    float zero point (``zero_point="float"``): (s [...], m [...]), float32, both rounded to
    ``scale_dtype``. m = min(w), s = (max(w) - min(w)) / (2^b - 1) (``clip`` shrinks the range
    about its middle); a weight is stored as clamp(round((w - m) / s), 0, 2^b - 1) and stands
    for code * s + m (GGUF's Q4_1 grid)."""
    w = w.to(torch.float32)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    if not (isinstance(clip, float) and clip == 1.0):
        mid = (lo + hi) / 2
        lo, hi = mid + (lo - mid) * clip, mid + (hi - mid) * clip
    s = ((hi - lo) / ((1 << bits) - 1)).to(scale_dtype).to(torch.float32)
    return s, lo.to(scale_dtype).to(torch.float32)


def offset_codes(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (float32, integral) of ``w`` [..., g] on the float-offset grid (s, m [...]); a zero
    scale (a constant group) gives code 0."""
    safe = torch.where(s != 0, s, torch.ones_like(s))
    return torch.clamp(torch.round((w.to(torch.float32) - m[..., None]) / safe[..., None]), 0, (1 << bits) - 1)


def quantize_codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Codes (float32, integral) of ``w`` [..., g] with the group parameters s, z [...]
    (broadcast over the last dim); a zero scale gives code z. A negative scale (the "extreme"
    and "best" grids) mirrors the group's codes."""
    lo, hi = code_range(bits, symmetric)
    safe = torch.where(s != 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(w.to(torch.float32) / safe[..., None]) + z[..., None], lo, hi)


def pack_codes(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Integral codes [N, K] (from quantize_codes) -> the qweight tensor of format v1."""
    if bits == 4:
        return pack_int4(codes.to(torch.uint8)).contiguous()
    if bits in STREAM_BITS:
        return pack_bits(codes, bits)
    return codes.to(torch.int8 if symmetric else torch.uint8).contiguous()


@torch.no_grad()
def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  scale_dtype: torch.dtype | None = None, clip: torch.Tensor | float = 1.0,
                  grid: str = "range", zero_point: str = "integer") -> torch.Tensor:
    """The float32 weight [N, K] that quantize_rtn's tensors stand for (quantize, then
    dequantize), without packing; ``clip`` [N, G] or scalar as in group_params."""
    N, K = weight.shape
    float_offset = not symmetric and zero_point == "float"
    w = grouped(weight.to(torch.float32), group_size, edge=float_offset)
    if float_offset:
        s, m = offset_params(w, bits, scale_dtype or weight.dtype, clip)
        dq = offset_codes(w, s, m, bits) * s[..., None] + m[..., None]
    else:
        s, z = group_params(w, bits, symmetric, scale_dtype or weight.dtype, clip, grid)
        dq = (quantize_codes(w, s, z, bits, symmetric) - z[..., None]) * s[..., None]
    return dq.reshape(N, -1)[:, :K]


@torch.no_grad()
def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype | None = None, clip: torch.Tensor | float = 1.0,
                 grid: str = "range", zero_point: str = "integer") -> QuantizedWeight:
    """Round-to-nearest quantization of a float weight [N, K] to format v1 tensors.

    Scales are rounded to ``scale_dtype`` (default: the weight's dtype) before the codes
    are computed, so the stored scale is exactly the one the codes were made for.
    ``clip`` [N, G] or scalar shrinks each group's range first, as in group_params; ``grid``
    places a symmetric grid (group_params), ``zero_point="float"`` gives an asymmetric grid
    a float offset (offset_params) instead of an integer zero point.
    """
    if zero_point not in ZERO_POINTS:
        raise ValueError(f"hfquant: zero_point={zero_point!r} is not supported (use one of {ZERO_POINTS})")
    if weight.dim() != 2:
        raise ValueError(f"quantize_rtn: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"quantize_rtn: weight must be floating point, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError("quantize_rtn: weight contains NaN or Inf")
    N, K = weight.shape
    scale_dtype = scale_dtype or weight.dtype
    float_offset = not symmetric and zero_point == "float"
    w = grouped(weight.detach().to(torch.float32), group_size, edge=float_offset)  # [N, G, g]
    if float_offset:
        s, m = offset_params(w, bits, scale_dtype, clip)
        codes = offset_codes(w, s, m, bits).reshape(N, -1)[:, :K]
        return QuantizedWeight(pack_codes(codes, bits, False), s.to(scale_dtype).contiguous(), None, bits,
                               group_size, K, offsets=m.to(scale_dtype).contiguous())
    s, z = group_params(w, bits, symmetric, scale_dtype, clip, grid)
    codes = quantize_codes(w, s, z, bits, symmetric).reshape(N, -1)[:, :K]
    zeros = None if symmetric else z.to(torch.uint8)
    return QuantizedWeight(pack_codes(codes, bits, symmetric), s.to(scale_dtype).contiguous(), zeros, bits,
                           group_size, K)


def codes_and_zeros(qweight: torch.Tensor, zeros: torch.Tensor | None, bits: int, in_features: int):
    """Codes [N, K] (int32) and zero points [N, G] or [N, 1] (int32) of format v1 tensors."""
    if bits == 4:
        codes = unpack_int4(qweight, in_features)
    elif bits in STREAM_BITS:
        codes = unpack_bits(qweight, bits, in_features)
    else:
        codes = qweight
    codes = codes.to(torch.int32)
    if zeros is not None:
        return codes, zeros.to(torch.int32)
    # symmetric: b-bit codes are the value + 2^(b-1); int8 values are their own codes
    return codes, torch.full((qweight.shape[0], 1), symmetric_zero(bits), dtype=torch.int32,
                             device=qweight.device)


@torch.no_grad()
def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               group_size: int, in_features: int, dtype: torch.dtype | None = None,
               offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Format v1 tensors -> the float weight [N, K] they stand for: (code - zero) * scale, or
    code * scale + offset with float offsets (float32 arithmetic, then ``dtype``)."""
    K = in_features
    g = K if group_size == -1 else group_size
    s = scales.to(torch.float32)
    if offsets is not None:
        codes, _ = codes_and_zeros(qweight, torch.zeros_like(scales, dtype=torch.uint8), bits, in_features)
        gidx = torch.arange(K, device=codes.device) // g
        w = codes.to(torch.float32) * s[:, gidx] + offsets.to(torch.float32)[:, gidx]
        return w.to(dtype or scales.dtype)
    codes, z = codes_and_zeros(qweight, zeros, bits, in_features)
    gidx = torch.arange(K, device=codes.device) // g
    zz = z if z.shape[1] == s.shape[1] else z.expand(-1, s.shape[1])
    w = (codes - zz[:, gidx]).to(torch.float32) * s[:, gidx]
    return w.to(dtype or scales.dtype)


def validate(name: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
             group_size: int, in_features: int, out_features: int, symmetric: bool,
             offsets: torch.Tensor | None = None, signed_scales: bool = False) -> None:
    """Raises ValueError naming the tensor when loaded tensors do not fit format v1 (and 2:
    float ``offsets`` in place of zeros; negative symmetric scales where ``signed_scales``)."""
    G = num_groups(in_features, group_size)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"hfquant: {name}: bits={bits} is not supported (use one of {SUPPORTED_BITS})")
    if bits in STREAM_BITS:
        want_q = ((out_features, packed_columns(in_features, bits)), torch.uint8)
    else:
        want_q = ((out_features, in_features), torch.int8 if symmetric else torch.uint8)
    if tuple(qweight.shape) != want_q[0] or qweight.dtype != want_q[1]:
        raise ValueError(
            f"hfquant: {name}.qweight has shape {tuple(qweight.shape)} and dtype {qweight.dtype}; "
            f"expected {want_q[0]} {want_q[1]} for bits={bits}, in_features={in_features}"
        )
    if tuple(scales.shape) != (out_features, G) or not scales.is_floating_point():
        raise ValueError(
            f"hfquant: {name}.scales has shape {tuple(scales.shape)} and dtype {scales.dtype}; "
            f"expected ({out_features}, {G}) floating point for group_size={group_size}"
        )
    if not torch.isfinite(scales).all():
        raise ValueError(f"hfquant: {name}.scales contains NaN or Inf")
    if (scales < 0).any() and not (signed_scales and symmetric and bits < 8):
        raise ValueError(f"hfquant: {name}.scales contains negative values")
    if offsets is not None:
        if symmetric or zeros is not None:
            raise ValueError(f"hfquant: {name}.offsets is present but the scheme has "
                             f"{'no zero point' if symmetric else 'integer zero points'}")
        if tuple(offsets.shape) != (out_features, G) or offsets.dtype != scales.dtype:
            raise ValueError(
                f"hfquant: {name}.offsets has shape {tuple(offsets.shape)} and dtype {offsets.dtype}; "
                f"expected ({out_features}, {G}) {scales.dtype}")
        if not torch.isfinite(offsets).all():
            raise ValueError(f"hfquant: {name}.offsets contains NaN or Inf")
    elif symmetric:
        if zeros is not None:
            raise ValueError(f"hfquant: {name}.zeros is present but the scheme is symmetric")
        if bits == 8 and (qweight == -128).any():
            raise ValueError(f"hfquant: {name}.qweight holds -128, outside the symmetric int8 range -127..127")
    else:
        if zeros is None:
            raise ValueError(f"hfquant: {name}.zeros is missing (asymmetric scheme with integer zero points)")
        if tuple(zeros.shape) != (out_features, G) or zeros.dtype != torch.uint8:
            raise ValueError(
                f"hfquant: {name}.zeros has shape {tuple(zeros.shape)} and dtype {zeros.dtype}; "
                f"expected ({out_features}, {G}) torch.uint8"
            )
        if bits < 8 and (zeros > (1 << bits) - 1).any():
            raise ValueError(f"hfquant: {name}.zeros holds values above {(1 << bits) - 1}, out of range for "
                             f"{bits}-bit")
    if bits in (2, 3) and in_features * bits % 8:
        # the unused high bits of each row's last byte must be zero (nothing else decodes there)
        if (qweight[:, -1] >> (in_features * bits % 8)).any():
            raise ValueError(f"hfquant: {name}.qweight has nonzero padding bits after the last code of a row")

