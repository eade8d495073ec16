"""Pure-torch twins of every native op: the documented semantics and the test oracle.

Each function has the same signature as ``torch.ops.hfquant.<op>``. They are also an
explicit backend (``hfquant.settings.backend = "ref"``), never a silent fallback. Production code imports
this module only for that backend (hfquant/ops.py); the layout facts the twins share with it
(constants, group geometry, unpacking a kernel layout) live in hfquant/formats/kernel_layouts.py.
"""
from __future__ import annotations

import torch

from .formats.kernel_layouts import (CUDA_ROW_PAD, CUDA_SEG_BYTES, I8_CUDA_PAD, I8_KG, I8_TILE,  # noqa: F401
                                     K_ALIGN, LUT_TABLE, LUT_UNIT_K, NR, codes_from_cuda_layout, codes_from_packed,
                                     cuda_code_positions, cuda_seg_k, group_geometry, int8_weight_from_packed,
                                     lut_group_geometry, lut_indices_from_packed, lut_qweight_from_packed,
                                     qweight_from_packed, round_up)
from .formats.kernel_layouts import dequantize_packed as dequantize_packed_ref  # noqa: F401
from .formats.v1 import unpack_int4
from .transforms import fwht, rms_norm


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int, asymmetric: bool) -> torch.Tensor:
    """Canonical qweight -> unsigned codes v as int32 [N, K] (4-bit 0..15, 8-bit 0..255)."""
    if bits == 4:
        return unpack_int4(qweight, in_features).to(torch.int32)
    if asymmetric:
        return qweight.to(torch.int32)
    return qweight.to(torch.int32) + 128


# --- the CUDA kernel layout (csrc/cuda/qlinear_layout.cuh, docs/formats.md) ----------------
def repack_cuda_ref(qweight, scales, zeros, bits: int, group_size: int, in_features: int, offsets=None):
    """Twin of ``hfquant::repack`` on CUDA: canonical tensors -> the CUDA kernel layout.

    packed_weight uint8 [Np, Kp*bits/8] (Np = round_up(N, 64), Kp = round_up(K, 128 | 64)),
    codes permuted inside each 64-byte row segment so that one 16-byte load per lane holds
    the mma.m16n8k16 B fragments; packed_scales float32 [G, P, Np]: plane 0 the scales,
    plane 1 (asymmetric only, P = 2) the zero points; padding is 0. Float offsets are refused,
    as by the op (its tensor-core path multiplies integer v - z).
    """
    if offsets is not None:
        raise ValueError('hfquant::repack: float offsets (zero_point="float") are not supported by the CUDA '
                         'kernels yet; quantize with zero_point="integer" to run on CUDA')
    K = in_features
    N = qweight.shape[0]
    dev = qweight.device
    _, G = group_geometry(group_size, K)
    Np = round_up(N, CUDA_ROW_PAD)
    KU = cuda_seg_k(bits)
    Kp = round_up(K, KU)
    U = Kp // KU
    v = torch.zeros(Np, Kp, dtype=torch.int32, device=dev)
    v[:N, :K] = unpack_codes(qweight, bits, K, zeros is not None)
    byte, shift = cuda_code_positions(bits)
    seg = v.reshape(Np, U, KU)
    out = torch.zeros(Np, U, CUDA_SEG_BYTES, dtype=torch.int32, device=dev)
    idx = byte.to(dev).expand(Np, U, KU)
    out.scatter_add_(2, idx, seg << shift.to(device=dev, dtype=torch.int32))  # nibbles of a byte never overlap
    w = out.reshape(Np, U * CUDA_SEG_BYTES).to(torch.uint8)
    P = 1 if zeros is None else 2
    ps = torch.zeros(G, P, Np, dtype=torch.float32, device=dev)
    ps[:, 0, :N] = scales.to(torch.float32).t()
    if zeros is not None:
        ps[:, 1, :N] = zeros.to(torch.float32).t()
    return w, ps


def repack_ref(qweight, scales, zeros, bits: int, group_size: int, in_features: int, offsets=None):
    """Twin of ``hfquant::repack``: canonical tensors -> (packed_weight, packed_scales).

    CUDA tensors get the CUDA kernel layout (``repack_cuda_ref``), like the op. ``offsets``
    (float [N, G], instead of zeros): the weight is code * scale + offset."""
    if qweight.is_cuda:
        return repack_cuda_ref(qweight, scales, zeros, bits, group_size, in_features, offsets)
    if offsets is not None and zeros is not None:
        raise ValueError("hfquant::repack: zeros and offsets are exclusive (integer zero points or float offsets)")
    K = in_features
    N = qweight.shape[0]
    gs, G = group_geometry(group_size, K)
    Kp = round_up(K, K_ALIGN)
    T = -(-N // NR)
    v = unpack_codes(qweight, bits, K, zeros is not None or offsets is not None)
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
    sb[:N, :, 1] = s * (z + off) if offsets is None else s * off - offsets.to(torch.float32)
    sb = sb.reshape(T, NR, G, 2).permute(0, 2, 3, 1).contiguous()
    return w, sb


def qembedding_ref(ids, packed_weight, packed_scales, bits: int, group_size: int, out_features: int,
                   in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Twin of ``hfquant::qembedding``: rows ``ids`` [...] of the weight a packed pair (CPU or
    CUDA layout) stands for, (v - z) * s in float32 exactly as ``formats.dequantize`` computes
    it from the checkpoint tensors, then cast to ``dtype``: [..., K]. Decodes only those rows."""
    K = in_features
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"hfquant::qembedding: ids must be int64 or int32, got {ids.dtype}")
    flat = ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= out_features):
        bad = flat[(flat < 0) | (flat >= out_features)][0]
        raise ValueError(f"hfquant::qembedding: id {int(bad)} is out of range for {out_features} rows")
    gs, G = group_geometry(group_size, K)
    if packed_weight.dim() == 2:  # CUDA layout: rows in order, scales [G, P, Np]
        v = codes_from_cuda_layout(packed_weight[flat], bits)
        s = packed_scales[:, 0, flat].t()
        z = packed_scales[:, 1, flat].t() if packed_scales.shape[1] == 2 else torch.full_like(s, 8.0 if bits == 4
                                                                                             else 128.0)
    else:  # CPU layout: tiles of NR rows
        t, r = flat // NR, flat % NR
        rows = packed_weight[t, :, r, :].to(torch.int32)  # [n, U, 16]
        n, U = rows.shape[0], rows.shape[1]  # explicit sizes: n may be 0
        if bits == 4:
            v = torch.stack([rows & 0x0F, rows >> 4], dim=2).reshape(n, U * 32)
        else:
            v = rows.reshape(n, U * 16)
        sb = packed_scales[t, :, :, r]  # [n, G, 2]
        off = 128.0 if bits == 4 else 0.0
        s = sb[..., 0]
        # the layout holds s * (z + off); z is integral and comes back exactly
        z = torch.where(s != 0, torch.round(sb[..., 1] / torch.where(s != 0, s, 1.0)) - off, 0.0)
    gidx = torch.clamp(torch.arange(v.shape[1], device=v.device) // gs, max=G - 1)
    w = (v.to(torch.float32) - z[:, gidx]) * s[:, gidx]
    return w[:, :K].to(dtype).reshape(*ids.shape, K)


def qlinear_ref(x, packed_weight, packed_scales, bias, bits: int, group_size: int, out_features: int,
                in_features: int) -> torch.Tensor:
    """Twin of ``hfquant::qlinear``: x @ dequant(W)^T + bias, accumulated in float64."""
    w = dequantize_packed_ref(packed_weight, packed_scales, bits, group_size, out_features, in_features)
    y = x.to(torch.float64) @ w.to(torch.float64).t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


def quantize_act_blocks_ref(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x' float32 [..., K], q int8 [..., Kp], d float32 [..., Kp/block]): int8 per
    block of ``block`` values (the last zero padded), d = max|x| / 127, q = round-half-even(x / d)."""
    K = x.shape[-1]
    xf = torch.nn.functional.pad(x.to(torch.float32), (0, (-K) % block))
    v = xf.reshape(*xf.shape[:-1], -1, block)
    d = v.abs().amax(-1) / 127.0
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.where(d[..., None] > 0, torch.round(v / safe[..., None]).clamp(-127, 127), torch.zeros_like(v))
    xq = (q * d[..., None]).reshape(xf.shape)[..., :K]
    return xq, q.to(torch.int8).reshape(xf.shape), d


def qlinear_a8_ref(x, packed_weight, packed_scales, bias, bits: int, group_size: int, out_features: int,
                   in_features: int) -> torch.Tensor:
    """Twin of ``hfquant::qlinear_a8``: x quantized to int8 in blocks of 32, then the float64
    product with the dequantized 4-bit weight."""
    if bits != 4:
        raise ValueError(f"hfquant::qlinear_a8: bits={bits} is not supported (4-bit weights only; use qlinear)")
    xq = quantize_act_blocks_ref(x)[0]
    return qlinear_ref(xq.to(torch.float64), packed_weight, packed_scales, bias, bits, group_size, out_features,
                       in_features).to(x.dtype)


def _routed_ref(op: str, linear, x, packed_weight, expert_ids, bias, out_features: int) -> torch.Tensor:
    # [R, N] in x.dtype: linear(rows of x, expert e, its bias) for each expert e present
    if expert_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"hfquant::{op}: expert_ids must be int64 or int32, got {expert_ids.dtype}")
    E = packed_weight.shape[0]
    ids = expert_ids.long()
    bad = (ids < 0) | (ids >= E)
    if bad.any():
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"hfquant::{op}: expert id {int(ids[r])} at row {r} is out of range for {E} experts")
    y = x.new_empty((x.shape[0], out_features))
    for e in torch.unique(ids).tolist():
        rows = (ids == e).nonzero().flatten()
        y[rows] = linear(x[rows], e, None if bias is None else bias[e])
    return y


def qlinear_routed_ref(x, packed_weight, packed_scales, expert_ids, bias, bits: int, group_size: int,
                       out_features: int, in_features: int) -> torch.Tensor:
    """Twin of ``hfquant::qlinear_routed``: for each expert e present, ``qlinear_ref`` of its rows
    (expert_ids == e) with packed_weight[e], packed_scales[e] and bias[e]; [R, N] in x.dtype."""
    return _routed_ref("qlinear_routed", lambda xe, e, b: qlinear_ref(xe, packed_weight[e], packed_scales[e], b, bits,
                                                                      group_size, out_features, in_features),
                       x, packed_weight, expert_ids, bias, out_features)


def qlinear_routed_a8_ref(x, packed_weight, packed_scales, expert_ids, bias, bits: int, group_size: int,
                          out_features: int, in_features: int) -> torch.Tensor:
    """Twin of ``hfquant::qlinear_routed_a8``: ``qlinear_a8_ref`` of each expert's rows."""
    if bits != 4:
        raise ValueError(f"hfquant::qlinear_routed_a8: bits={bits} is not supported (4-bit experts only; use "
                         "qlinear_routed)")
    return _routed_ref("qlinear_routed_a8", lambda xe, e, b: qlinear_a8_ref(xe, packed_weight[e], packed_scales[e], b,
                                                                            bits, group_size, out_features,
                                                                            in_features),
                       x, packed_weight, expert_ids, bias, out_features)


# --- int8 activations (W8A8, LLM.int8()) -------------------------------------------------


def int8_pack_ref(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of ``hfquant::int8_pack``: int8 [N, K] -> (int8 [Nt, K4, 16, 4], colsum int32 [N]).

    CUDA tensors get the CUDA layout (``int8_pack_cuda_ref``), like the op."""
    if qweight.is_cuda:
        return int8_pack_cuda_ref(qweight)
    N, K = qweight.shape
    Nt, K4 = -(-N // I8_TILE), -(-K // I8_KG)
    w = torch.zeros(Nt * I8_TILE, K4 * I8_KG, dtype=torch.int8)
    w[:N, :K] = qweight
    packed = w.view(Nt, I8_TILE, K4, I8_KG).permute(0, 2, 1, 3).contiguous()
    return packed, qweight.to(torch.int32).sum(1, dtype=torch.int32)


def int8_pack_cuda_ref(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of ``hfquant::int8_pack`` on CUDA: int8 [N, K] -> (int8 [round_up(N,16), round_up(K,16)]
    zero padded, colsum int32 [N])."""
    N, K = qweight.shape
    w = torch.zeros(round_up(N, I8_CUDA_PAD), round_up(K, I8_CUDA_PAD), dtype=torch.int8, device=qweight.device)
    w[:N, :K] = qweight
    return w, qweight.to(torch.int32).sum(1, dtype=torch.int32)


def _check_threshold(op: str, threshold: float) -> None:
    if not threshold >= 0:
        raise RuntimeError(f"hfquant::{op}: threshold={threshold} must be >= 0 (0 turns outlier detection off, "
                           "inf keeps only non-finite values apart)")


def quantize_act_ref(x: torch.Tensor, threshold: float = 0.0, act_scale: torch.Tensor | None = None):
    """Twin of ``hfquant::quantize_act``: per-row absmax int8 quantization of x * act_scale.

    threshold > 0: columns with any |x| >= threshold or a NaN/Inf are outliers: listed in
    ``outlier_cols`` (ascending), left out of each row's absmax and quantized to 0.
    Per row with absmax a over the other columns: scale = a / 127 and
    q = clamp(round_half_even(x * (127 / a)), -127, 127); a row whose kept values include
    NaN/Inf gets scale NaN and codes 0; a = 0 (or 127 / a = inf) gives scale 0, codes 0.
    """
    _check_threshold("quantize_act", threshold)
    K = x.shape[-1]
    xf = x.to(torch.float32)
    if act_scale is not None:
        xf = xf * act_scale.to(torch.float32)
    x2 = xf.reshape(-1, K)
    if threshold > 0:
        mask = (~(x2.abs() < threshold)).any(0)
    else:
        mask = torch.zeros(K, dtype=torch.bool, device=x.device)
    cols = mask.nonzero().flatten()
    kept = x2.masked_fill(mask, 0.0)
    a = kept.abs()
    bad = ~torch.isfinite(a).all(1)
    amax = a.amax(1) if K else torch.zeros(x2.shape[0], device=x.device)
    inv = torch.tensor(127.0, dtype=torch.float32, device=x.device) / amax
    zero = (amax == 0) | torch.isinf(inv)
    q = torch.round(kept * inv[:, None]).clamp(-127, 127)
    q[bad | zero] = 0
    scale = torch.where(zero, torch.zeros_like(amax), amax / 127.0)
    scale = torch.where(bad, torch.full_like(amax, float("nan")), scale)
    return q.to(torch.int8).reshape(x.shape), scale.reshape(x.shape[:-1]), cols


def int8_mm_ref(xq: torch.Tensor, packed_weight: torch.Tensor, colsum: torch.Tensor, out_features: int):
    """Twin of ``hfquant::int8_mm``: exact int32 xq @ W^T (int64 accumulation)."""
    if (xq == -128).any():
        raise RuntimeError("hfquant::int8_mm: xq holds -128; int8 activations must lie in [-127, 127]")
    w = int8_weight_from_packed(packed_weight, out_features, xq.shape[1])
    # (int64 matmul runs on the CPU only)
    return (xq.cpu().to(torch.int64) @ w.cpu().to(torch.int64).t()).to(torch.int32).to(xq.device)


def int8_gemm_ref(xq, x_scales, packed_weight, colsum, w_scales, bias, out_dtype, out_features: int):
    """Twin of ``hfquant::int8_gemm``: float(xq @ W^T) * (x_scales[m] * w_scales[n]) + bias[n]."""
    acc = int8_mm_ref(xq, packed_weight, colsum, out_features).to(torch.float32)
    y = acc * (x_scales.to(torch.float32)[:, None] * w_scales.to(torch.float32)[None, :])
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def int8_linear_ref(x, packed_weight, colsum, w_scales, bias, act_scale, threshold: float, out_features: int):
    """Twin of ``hfquant::int8_linear``: quantize_act, the int8 GEMM, plus the outlier columns
    of x * act_scale times the matching weight columns (dequantized) in float32."""
    K = x.shape[-1]
    q, s, cols = quantize_act_ref(x, threshold, act_scale)
    q2 = q.reshape(-1, K)
    y = int8_gemm_ref(q2, s.reshape(-1), packed_weight, colsum, w_scales, None, torch.float32, out_features)
    if cols.numel():
        xf = x.reshape(-1, K).to(torch.float32)
        if act_scale is not None:
            xf = xf * act_scale.to(torch.float32)
        w = int8_weight_from_packed(packed_weight, out_features, K)
        wo = w[:, cols].to(torch.float32) * w_scales.to(torch.float32)[:, None]
        y = y + xf[:, cols] @ wo.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


# --- quantized KV cache ----------------------------------------------------------------------
def kv_pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [..., D] (0..2^bits-1) -> uint8 [..., R], R = D*bits/8, in planes: element d in
    byte d % R at bit (d // R) * bits."""
    per = 8 // bits
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], per, codes.shape[-1] // per)  # [..., plane, R]
    shifts = (torch.arange(per, dtype=torch.int32, device=codes.device) * bits)[:, None]
    return (c << shifts).sum(-2).to(torch.uint8)


def kv_unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = (torch.arange(per, dtype=torch.int32, device=packed.device) * bits)[:, None]
    c = (packed.to(torch.int32).unsqueeze(-2) >> shifts) & ((1 << bits) - 1)  # [..., plane, R]
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _kv_check(op: str, bits: int, group_size: int, T: int, D: int, per_channel: bool) -> None:
    if bits not in (2, 4, 8):
        raise RuntimeError(f"hfquant::{op}: bits={bits} is not supported (use 2, 4 or 8)")
    if group_size <= 0:
        raise RuntimeError(f"hfquant::{op}: group_size={group_size} must be positive")
    if per_channel and T % group_size:
        raise RuntimeError(f"hfquant::{op}: per-channel (key) quantization needs a whole number of "
                           f"{group_size}-token groups; got {T} tokens")
    if not per_channel and D % group_size:
        raise RuntimeError(f"hfquant::{op}: group_size={group_size} does not divide head_dim={D}")


def kv_quantize_ref(x: torch.Tensor, bits: int, group_size: int, per_channel: bool):
    """Twin of ``hfquant::kv_quantize``: asymmetric min/max quantization of x [..., T, D].

    per_channel (keys): groups of group_size tokens of one channel, params [..., T/g, D];
    else (values): groups of group_size channels of one token, params [..., T, D/g].
    scale = (max - min) / (2^bits - 1) and min, stored float16; codes from the stored values:
    clamp(round_half_even((x - min) * (1 / scale)), 0, 2^bits - 1), 0 where scale is 0.
    A group holding NaN/Inf gets NaN scale and min and codes 0.
    """
    *lead, T, D = x.shape
    _kv_check("kv_quantize", bits, group_size, T, D, per_channel)
    qmax = (1 << bits) - 1
    xf = x.to(torch.float32)
    if per_channel:
        grp = xf.reshape(*lead, T // group_size, group_size, D)
        red = -2
    else:
        grp = xf.reshape(*lead, T, D // group_size, group_size)
        red = -1
    finite = torch.isfinite(grp).all(red)
    lo, hi = grp.amin(red), grp.amax(red)
    scale = ((hi - lo) / qmax).to(torch.float16)
    mn = lo.to(torch.float16)
    s32 = scale.to(torch.float32)
    inv = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32))
    c = torch.round((grp - mn.to(torch.float32).unsqueeze(red)) * inv.unsqueeze(red)).clamp(0, qmax)
    c = torch.where(finite.unsqueeze(red), c, torch.zeros_like(c))
    nan = torch.tensor(float("nan"), dtype=torch.float16, device=x.device)
    scale = torch.where(finite, scale, nan)
    mn = torch.where(finite, mn, nan)
    codes = kv_pack_codes(c.reshape(*lead, T, D).to(torch.int32), bits)
    return codes, scale, mn


def kv_dequantize_ref(codes, scales, mins, length: int, bits: int, group_size: int, per_channel: bool,
                      dtype: torch.dtype):
    """Twin of ``hfquant::kv_dequantize``: the first ``length`` tokens as c * scale + min."""
    c = kv_unpack_codes(codes[..., :length, :], bits).to(torch.float32)
    s, m = scales.to(torch.float32), mins.to(torch.float32)
    if per_channel:
        s = s.repeat_interleave(group_size, dim=-2)[..., :length, :]
        m = m.repeat_interleave(group_size, dim=-2)[..., :length, :]
    else:
        s = s[..., :length, :].repeat_interleave(group_size, dim=-1)
        m = m[..., :length, :].repeat_interleave(group_size, dim=-1)
    return (c * s + m).to(dtype)


def kv_dequantize_into_ref(codes, scales, mins, out, length: int, bits: int, group_size: int,
                           per_channel: bool) -> None:
    """Twin of ``hfquant::kv_dequantize_into``: kv_dequantize written into out[..., :length, :]."""
    out[..., :length, :] = kv_dequantize_ref(codes, scales, mins, length, bits, group_size, per_channel, out.dtype)


def kv_dequantize_rotated_into_ref(codes, scales, mins, out, length: int, bits: int, group_size: int,
                                   signs) -> None:
    """Twin of hfquant::kv_dequantize_rotated_into: dequantize (per token) in out's dtype, then the
    inverse transform of each token."""
    D = codes.shape[-1] * 8 // bits
    if D & (D - 1):
        raise ValueError(f"hfquant::kv_dequantize_rotated_into: head_dim={D} is not a power of two")
    kv_dequantize_into_ref(codes, scales, mins, out, length, bits, group_size, False)
    out[..., :length, :] = fwht(out[..., :length, :], signs, inverse=True)


def kv_append_ref(x, codes, scales, mins, offset: int, bits: int, group_size: int, per_channel: bool) -> None:
    """Twin of ``hfquant::kv_append``: kv_quantize of x written into the stores at token offset."""
    t = x.shape[-2]
    c, s, m = kv_quantize_ref(x, bits, group_size, per_channel)
    codes[..., offset:offset + t, :] = c
    if per_channel:
        p0, p1 = offset // group_size, (offset + t) // group_size
    else:
        p0, p1 = offset, offset + t
    scales[..., p0:p1, :] = s
    mins[..., p0:p1, :] = m


# --- weight clustering (LUT kernel, csrc/cpu/lut_linear.h) -----------------------------------


def hadamard_transform_ref(x: torch.Tensor, signs: torch.Tensor | None = None, inverse: bool = False,
                           mix: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of hfquant::hadamard_transform: the butterflies (and the mix) in torch (bit for bit in
    float32)."""
    return fwht(x, signs, inverse, mix)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Twin of hfquant::rms_norm: weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), float32 inside."""
    return rms_norm(x, weight, eps)


def lut_repack_ref(qweight: torch.Tensor, codebook: torch.Tensor, bits: int, group_size: int, in_features: int):
    """Twin of ``hfquant::lut_repack``: (qweight, codebook) -> (indices uint8 [N, Kp/2], table fp32 [N, G, 16])."""
    from .formats.lut import unpack_indices

    N, K = qweight.shape[0], in_features
    Kp = round_up(K, LUT_UNIT_K)
    v = torch.zeros(N, Kp, dtype=torch.int64)
    v[:, :K] = unpack_indices(qweight, bits, K)
    u = v.reshape(N, Kp // 32, 2, 16)
    idx = (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(N, Kp // 2).to(torch.uint8)
    tab = torch.zeros(N, codebook.shape[1], LUT_TABLE, dtype=torch.float32)
    tab[:, :, : 1 << bits] = codebook.to(torch.float32)
    return idx, tab


def lut_dequantize_packed_ref(packed_indices, packed_codebook, group_size: int, in_features: int) -> torch.Tensor:
    """The float32 weight [N, K] a LUT kernel layout stands for."""
    idx = lut_indices_from_packed(packed_indices, in_features)
    N = idx.shape[0]
    gs, G = lut_group_geometry(group_size, in_features)
    gidx = (torch.arange(in_features) // gs).expand(N, -1)
    return packed_codebook[torch.arange(N)[:, None], gidx, idx]


def lut_linear_ref(x, packed_indices, packed_codebook, bias, bits: int, group_size: int, out_features: int,
                   in_features: int) -> torch.Tensor:
    """Twin of ``hfquant::lut_linear``: x @ W^T + bias, accumulated in float64, in x.dtype."""
    w = lut_dequantize_packed_ref(packed_indices, packed_codebook, group_size, in_features)
    y = x.to(torch.float64) @ w.to(torch.float64).t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)
