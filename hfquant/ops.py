"""Typed entry points to ``torch.ops.hfquant.*`` and their fake (meta) kernels.

The fake kernels let ``torch.compile`` trace the ops and let models be built on the meta
device. ``hfquant.settings.backend = "ref"`` routes the wrappers to the pure-torch twins in ref.py.
"""
from __future__ import annotations

import torch

from . import _ext  # noqa: F401  (registers torch.ops.hfquant)
from ._ext import _C
from . import transforms as _transforms
from .runtime import settings as _settings
from .formats.kernel_layouts import (CUDA_ROW_PAD, I8_CUDA_PAD, I8_KG, I8_TILE, K_ALIGN, LUT_TABLE, LUT_UNIT_K, NR,
                                     cuda_seg_k, group_geometry, lut_group_geometry, round_up)


def _ref():
    """hfquant/ref.py, the pure-torch twins: imported only when the ref backend is selected."""
    from . import ref

    return ref


def _backend() -> str:
    return _settings.backend


def _direct_ok(x: torch.Tensor, packed_weight: torch.Tensor, packed_scales: torch.Tensor,
               bias: torch.Tensor | None) -> bool:
    """Whether a qlinear call may skip the dispatcher and call the CPU kernel directly: plain
    CPU tensors, no gradient wanted, not under torch.compile tracing (which must see the op).
    The kernel and its argument checks are the same either way."""
    if type(x) is not torch.Tensor or x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or packed_scales.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return (type(packed_weight) is torch.Tensor and type(packed_scales) is torch.Tensor
            and (bias is None or type(bias) is torch.Tensor))


@torch.library.register_fake("hfquant::repack")
def _repack_fake(qweight, scales, zeros, bits, group_size, in_features, offsets=None):
    torch._check(bits in (4, 8), lambda: f"hfquant::repack: bits={bits} is not supported (use 4 or 8)")
    N = qweight.shape[0]
    gs, G = group_geometry(group_size, in_features)
    if qweight.device.type == "cuda":  # the CUDA layout (ref.repack_cuda_ref)
        Np = round_up(N, CUDA_ROW_PAD)
        Kp = round_up(in_features, cuda_seg_k(bits))
        w = qweight.new_empty((Np, Kp * bits // 8), dtype=torch.uint8)
        sb = scales.new_empty((G, 1 if zeros is None else 2, Np), dtype=torch.float32)
        return w, sb
    Kp = round_up(in_features, K_ALIGN)
    T = -(-N // NR)
    unit = 32 if bits == 4 else 16
    w = qweight.new_empty((T, Kp // unit, NR, 16), dtype=torch.uint8)
    sb = scales.new_empty((T, G, 2, NR), dtype=torch.float32)
    return w, sb


@torch.library.register_fake("hfquant::qlinear")
def _qlinear_fake(x, packed_weight, packed_scales, bias, bits, group_size, out_features, in_features):
    torch._check(x.shape[-1] == in_features,
                 lambda: f"hfquant::qlinear: x has last dimension {x.shape[-1]}, expected {in_features}")
    torch._check(x.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 lambda: f"hfquant::qlinear: x must be float32, bfloat16 or float16, got {x.dtype}")
    return x.new_empty((*x.shape[:-1], out_features))


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
           group_size: int, in_features: int,
           offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical checkpoint tensors -> the kernel layout (docs/formats.md).

    qweight: 4-bit uint8 [N, ceil(K/2)]; 8-bit int8 [N, K] (symmetric) or uint8 [N, K] (asymmetric).
    scales: floating [N, G]; zeros: uint8 [N, G] or None (symmetric); offsets: floating [N, G]
    instead of zeros for float offsets (weight = code * scale + offset; CPU only).
    Returns packed_weight uint8 [T, Kp/32 or Kp/16, 4, 16] and packed_scales float32 [T, G, 2, 4]
    on the CPU; on CUDA packed_weight uint8 [Np, Kp*bits/8] and packed_scales float32
    [G, 1 or 2, Np] (docs/formats.md, "Kernel layout").
    """
    if _backend() == "ref":
        return _ref().repack_ref(qweight, scales, zeros, bits, group_size, in_features, offsets)
    return torch.ops.hfquant.repack(qweight, scales, zeros, bits, group_size, in_features, offsets)


def qlinear(x: torch.Tensor, packed_weight: torch.Tensor, packed_scales: torch.Tensor,
            bias: torch.Tensor | None, bits: int, group_size: int, out_features: int,
            in_features: int) -> torch.Tensor:
    """y = x @ W^T + bias for W in the kernel layout; x float32/bfloat16/float16 [..., K]."""
    if _backend() == "ref":
        return _ref().qlinear_ref(x, packed_weight, packed_scales, bias, bits, group_size, out_features,
                                   in_features)
    if _direct_ok(x, packed_weight, packed_scales, bias):
        return _C.qlinear_cpu(x, packed_weight, packed_scales, bias, bits, group_size, out_features, in_features)
    return torch.ops.hfquant.qlinear(x, packed_weight, packed_scales, bias, bits, group_size, out_features,
                                     in_features)


@torch.library.register_fake("hfquant::qlinear_a8")
def _qlinear_a8_fake(x, packed_weight, packed_scales, bias, bits, group_size, out_features, in_features):
    torch._check(bits == 4, lambda: f"hfquant::qlinear_a8: bits={bits} is not supported (4-bit weights only)")
    torch._check(x.shape[-1] == in_features,
                 lambda: f"hfquant::qlinear_a8: x has last dimension {x.shape[-1]}, expected {in_features}")
    torch._check(x.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 lambda: f"hfquant::qlinear_a8: x must be float32, bfloat16 or float16, got {x.dtype}")
    return x.new_empty((*x.shape[:-1], out_features))


def qlinear_a8(x: torch.Tensor, packed_weight: torch.Tensor, packed_scales: torch.Tensor,
               bias: torch.Tensor | None, bits: int, group_size: int, out_features: int,
               in_features: int) -> torch.Tensor:
    """``qlinear`` of a 4-bit weight with int8 activations: x quantized per row in blocks of 32
    (max|x| / 127, round half to even), integer dot products (VNNI) with the codes; CPU."""
    if _backend() == "ref":
        return _ref().qlinear_a8_ref(x, packed_weight, packed_scales, bias, bits, group_size, out_features,
                                     in_features)
    return torch.ops.hfquant.qlinear_a8(x, packed_weight, packed_scales, bias, bits, group_size, out_features,
                                        in_features)


def _qlinear_routed_fake(x, packed_weight, packed_scales, expert_ids, bias, bits, group_size, out_features,
                         in_features, op="qlinear_routed"):
    torch._check(x.dim() == 2 and x.shape[1] == in_features,
                 lambda: f"hfquant::{op}: x has shape {list(x.shape)}, expected [rows, in_features={in_features}]")
    torch._check(x.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 lambda: f"hfquant::{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    torch._check(expert_ids.dtype in (torch.int64, torch.int32),
                 lambda: f"hfquant::{op}: expert_ids must be int64 or int32, got {expert_ids.dtype}")
    torch._check(expert_ids.dim() == 1 and expert_ids.shape[0] == x.shape[0],
                 lambda: f"hfquant::{op}: expert_ids has shape {list(expert_ids.shape)}, expected "
                         f"[{x.shape[0]}] (one expert per row of x)")
    return x.new_empty((x.shape[0], out_features))


torch.library.register_fake("hfquant::qlinear_routed")(_qlinear_routed_fake)


@torch.library.register_fake("hfquant::qlinear_routed_a8")
def _qlinear_routed_a8_fake(x, packed_weight, packed_scales, expert_ids, bias, bits, group_size, out_features,
                            in_features):
    torch._check(bits == 4, lambda: f"hfquant::qlinear_routed_a8: bits={bits} is not supported (4-bit experts only)")
    return _qlinear_routed_fake(x, packed_weight, packed_scales, expert_ids, bias, bits, group_size, out_features,
                                in_features, "qlinear_routed_a8")


def qlinear_routed(x: torch.Tensor, packed_weight: torch.Tensor, packed_scales: torch.Tensor,
                   expert_ids: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int,
                   out_features: int, in_features: int) -> torch.Tensor:
    """Routed experts (MoE): y[r] = x[r] @ W[e]^T + bias[e], e = expert_ids[r].

    x float32/bfloat16/float16 [R, K]; packed_weight / packed_scales: ``repack``'s outputs of the
    E experts stacked on a new leading dim (CPU: uint8 [E, T, U, 4, 16], float32 [E, T, G, 2, 4]);
    expert_ids int64/int32 [R] in [0, E); bias [E, N] in x.dtype or float32, or None.
    Returns [R, N] in x.dtype, each expert's rows exactly as ``qlinear`` on them gives them;
    only the selected experts' weights are read.
    """
    if _backend() == "ref":
        return _ref().qlinear_routed_ref(x, packed_weight, packed_scales, expert_ids, bias, bits, group_size,
                                         out_features, in_features)
    if _direct_ok(x, packed_weight, packed_scales, bias) and type(expert_ids) is torch.Tensor:
        return _C.qlinear_routed_cpu(x, packed_weight, packed_scales, expert_ids, bias, bits, group_size,
                                     out_features, in_features)
    return torch.ops.hfquant.qlinear_routed(x, packed_weight, packed_scales, expert_ids, bias, bits, group_size,
                                            out_features, in_features)


def qlinear_routed_a8(x: torch.Tensor, packed_weight: torch.Tensor, packed_scales: torch.Tensor,
                      expert_ids: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int,
                      out_features: int, in_features: int) -> torch.Tensor:
    """``qlinear_routed`` of 4-bit experts with int8 activations: each row as ``qlinear_a8`` of
    that row with its expert's weights computes it; CPU."""
    if _backend() == "ref":
        return _ref().qlinear_routed_a8_ref(x, packed_weight, packed_scales, expert_ids, bias, bits, group_size,
                                            out_features, in_features)
    return torch.ops.hfquant.qlinear_routed_a8(x, packed_weight, packed_scales, expert_ids, bias, bits, group_size,
                                               out_features, in_features)


@torch.library.register_fake("hfquant::qembedding")
def _qembedding_fake(ids, packed_weight, packed_scales, bits, group_size, out_features, in_features, dtype):
    torch._check(ids.dtype in (torch.int64, torch.int32),
                 lambda: f"hfquant::qembedding: ids must be int64 or int32, got {ids.dtype}")
    return packed_scales.new_empty((*ids.shape, in_features), dtype=dtype)


def qembedding(ids: torch.Tensor, packed_weight: torch.Tensor, packed_scales: torch.Tensor, bits: int,
               group_size: int, out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` (int64/int32 [...]) of the weight [out_features, in_features] held in the
    kernel layout (from ``repack``), dequantized to ``dtype``: [..., in_features]. The lookup
    of a quantized token embedding, which may share its tensors with a tied lm_head.

    CPU: a C++ kernel. CUDA: torch ops that gather and decode only the rows asked for
    (hfquant/formats/cuda_rows.py, registered below as the op's CUDA implementation)."""
    if _backend() == "ref":
        return _ref().qembedding_ref(ids, packed_weight, packed_scales, bits, group_size, out_features, in_features,
                                      dtype)
    return torch.ops.hfquant.qembedding(ids, packed_weight, packed_scales, bits, group_size, out_features,
                                        in_features, dtype)


@torch.library.impl("hfquant::qembedding", "CUDA")
def _qembedding_cuda(ids, packed_weight, packed_scales, bits, group_size, out_features, in_features, dtype):
    from .formats.cuda_rows import decode_rows

    return decode_rows(ids, packed_weight, packed_scales, bits, group_size, out_features, in_features, dtype)


# --- int8 activations ---------------------------------------------------------------------
_I8 = (I8_TILE, I8_KG)


@torch.library.register_fake("hfquant::int8_pack")
def _int8_pack_fake(qweight):
    torch._check(qweight.dim() == 2, lambda: "hfquant::int8_pack: qweight must be 2-D")
    N, K = qweight.shape
    if qweight.device.type == "cuda":  # the CUDA layout (ref.int8_pack_cuda_ref)
        pad = I8_CUDA_PAD
        return (qweight.new_empty((round_up(N, pad), round_up(K, pad)), dtype=torch.int8),
                qweight.new_empty((N,), dtype=torch.int32))
    return (qweight.new_empty((-(-N // _I8[0]), -(-K // _I8[1]), _I8[0], _I8[1]), dtype=torch.int8),
            qweight.new_empty((N,), dtype=torch.int32))


@torch.library.register_fake("hfquant::quantize_act")
def _quantize_act_fake(x, threshold=0.0, act_scale=None):
    # The number of outlier columns depends on the data.
    n = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32),
            x.new_empty((n,), dtype=torch.int64))


@torch.library.register_fake("hfquant::int8_mm")
def _int8_mm_fake(xq, packed_weight, colsum, out_features):
    return xq.new_empty((xq.shape[0], out_features), dtype=torch.int32)


@torch.library.register_fake("hfquant::int8_gemm")
def _int8_gemm_fake(xq, x_scales, packed_weight, colsum, w_scales, bias, out_dtype, out_features):
    return xq.new_empty((xq.shape[0], out_features), dtype=out_dtype)


@torch.library.register_fake("hfquant::int8_linear")
def _int8_linear_fake(x, packed_weight, colsum, w_scales, bias, act_scale, threshold, out_features):
    torch._check(x.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 lambda: f"hfquant::int8_linear: x must be float32, bfloat16 or float16, got {x.dtype}")
    return x.new_empty((*x.shape[:-1], out_features))


def int8_pack(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights [N, K] -> (packed int8 [ceil(N/16), ceil(K/4), 16, 4], colsum int32 [N]);
    on CUDA packed int8 [round_up(N, 16), round_up(K, 16)] (row-major, zero padded)."""
    if _backend() == "ref":
        return _ref().int8_pack_ref(qweight)
    return torch.ops.hfquant.int8_pack(qweight)


def quantize_act(x: torch.Tensor, threshold: float = 0.0, act_scale: torch.Tensor | None = None):
    """Per-row int8 quantization of x [..., K]: (q int8, scales float32 [...], outlier_cols int64)."""
    if _backend() == "ref":
        return _ref().quantize_act_ref(x, threshold, act_scale)
    return torch.ops.hfquant.quantize_act(x, threshold, act_scale)


def int8_mm(xq: torch.Tensor, packed_weight: torch.Tensor, colsum: torch.Tensor, out_features: int):
    """Exact int32 xq [M, K] @ W^T."""
    if _backend() == "ref":
        return _ref().int8_mm_ref(xq, packed_weight, colsum, out_features)
    return torch.ops.hfquant.int8_mm(xq, packed_weight, colsum, out_features)


def int8_gemm(xq, x_scales, packed_weight, colsum, w_scales, bias, out_dtype: torch.dtype, out_features: int):
    """(xq @ W^T) * x_scales[m] * w_scales[n] + bias[n] in out_dtype."""
    if _backend() == "ref":
        return _ref().int8_gemm_ref(xq, x_scales, packed_weight, colsum, w_scales, bias, out_dtype, out_features)
    return torch.ops.hfquant.int8_gemm(xq, x_scales, packed_weight, colsum, w_scales, bias, out_dtype,
                                       out_features)


def int8_linear(x, packed_weight, colsum, w_scales, bias, act_scale, threshold: float, out_features: int):
    """W8A8 (threshold 0) or LLM.int8() (threshold > 0) linear layer; y in x.dtype."""
    if _backend() == "ref":
        return _ref().int8_linear_ref(x, packed_weight, colsum, w_scales, bias, act_scale, threshold, out_features)
    return torch.ops.hfquant.int8_linear(x, packed_weight, colsum, w_scales, bias, act_scale, threshold,
                                         out_features)


# --- quantized KV cache ----------------------------------------------------------------------
@torch.library.register_fake("hfquant::kv_quantize")
def _kv_quantize_fake(x, bits, group_size, per_channel):
    *lead, T, D = x.shape
    p = (T // group_size, D) if per_channel else (T, D // group_size)
    return (x.new_empty((*lead, T, D * bits // 8), dtype=torch.uint8), x.new_empty((*lead, *p), dtype=torch.float16),
            x.new_empty((*lead, *p), dtype=torch.float16))


@torch.library.register_fake("hfquant::kv_append")
def _kv_append_fake(x, codes, scales, mins, offset, bits, group_size, per_channel):
    return None


@torch.library.register_fake("hfquant::kv_dequantize")
def _kv_dequantize_fake(codes, scales, mins, length, bits, group_size, per_channel, dtype):
    return codes.new_empty((*codes.shape[:-2], length, codes.shape[-1] * 8 // bits), dtype=dtype)


@torch.library.register_fake("hfquant::kv_dequantize_into")
def _kv_dequantize_into_fake(codes, scales, mins, out, length, bits, group_size, per_channel):
    return None


@torch.library.register_fake("hfquant::kv_dequantize_rotated_into")
def _kv_dequantize_rotated_into_fake(codes, scales, mins, out, length, bits, group_size, signs):
    return None


def _kv_dequantize_rotated_into_composite(codes, scales, mins, out, length, bits, group_size, signs):
    """Devices without the fused kernel (CUDA for now): dequantize, then the transform in place."""
    torch.ops.hfquant.kv_dequantize_into(codes, scales, mins, out, length, bits, group_size, False)
    torch.ops.hfquant.hadamard_transform_inplace(out[..., :length, :], signs, True)


torch.library.register_kernel("hfquant::kv_dequantize_rotated_into", "cuda", _kv_dequantize_rotated_into_composite)


def kv_quantize(x: torch.Tensor, bits: int, group_size: int, per_channel: bool):
    """x [..., T, D] -> (codes uint8 [..., T, D*bits/8], scales fp16, mins fp16)."""
    if _backend() == "ref":
        return _ref().kv_quantize_ref(x, bits, group_size, per_channel)
    return torch.ops.hfquant.kv_quantize(x, bits, group_size, per_channel)


def kv_append(x, codes, scales, mins, offset: int, bits: int, group_size: int, per_channel: bool) -> None:
    """Quantizes x [..., t, D] into the stores at token ``offset``, in place."""
    if _backend() == "ref":
        return _ref().kv_append_ref(x, codes, scales, mins, offset, bits, group_size, per_channel)
    torch.ops.hfquant.kv_append(x, codes, scales, mins, offset, bits, group_size, per_channel)


def kv_dequantize(codes, scales, mins, length: int, bits: int, group_size: int, per_channel: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """The first ``length`` tokens of the stores in ``dtype``."""
    if _backend() == "ref":
        return _ref().kv_dequantize_ref(codes, scales, mins, length, bits, group_size, per_channel, dtype)
    return torch.ops.hfquant.kv_dequantize(codes, scales, mins, length, bits, group_size, per_channel, dtype)


def kv_dequantize_into(codes, scales, mins, out: torch.Tensor, length: int, bits: int, group_size: int,
                       per_channel: bool) -> None:
    """The first ``length`` tokens of the stores written into the first tokens of ``out``."""
    if _backend() == "ref":
        return _ref().kv_dequantize_into_ref(codes, scales, mins, out, length, bits, group_size, per_channel)
    torch.ops.hfquant.kv_dequantize_into(codes, scales, mins, out, length, bits, group_size, per_channel)


# --- online rotations (fast Walsh-Hadamard transform) -----------------------------------------
@torch.library.register_fake("hfquant::hadamard_transform")
def _hadamard_transform_fake(x, signs, inverse=False, mix=None):
    n = x.shape[-1]
    m = 1 if mix is None else mix.shape[0]
    torch._check(mix is None or (mix.dim() == 2 and mix.shape[0] == mix.shape[1] and m >= 1 and n % m == 0),
                 lambda: f"hfquant::hadamard_transform: mix must be a square matrix whose order divides the last "
                         f"dimension of x ({n})")
    p = n // m
    torch._check(p >= 1 and (p & (p - 1)) == 0,
                 lambda: f"hfquant::hadamard_transform: the last dimension of x ({n}) must be a power of two "
                         "(times mix's order)")
    torch._check(x.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 lambda: f"hfquant::hadamard_transform: x must be float32, bfloat16 or float16, got {x.dtype}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("hfquant::hadamard_transform_inplace")
def _hadamard_transform_inplace_fake(x, signs, inverse=False, mix=None):
    return None


def _hadamard_transform_composite(x, signs, inverse=False, mix=None):
    """Devices without a native kernel (CUDA for now): the torch butterflies, same results."""
    return _transforms.fwht(x, signs, inverse, mix)


def _hadamard_transform_inplace_composite(x, signs, inverse=False, mix=None):
    x.copy_(_transforms.fwht(x, signs, inverse, mix))


torch.library.register_kernel("hfquant::hadamard_transform", "cuda", _hadamard_transform_composite)
torch.library.register_kernel("hfquant::hadamard_transform_inplace", "cuda", _hadamard_transform_inplace_composite)


def _hadamard_setup(ctx, inputs, output):
    _, signs, inverse, mix = inputs
    ctx.signs, ctx.inverse, ctx.mix = signs, inverse, mix


def _hadamard_backward(ctx, grad):
    # the transform is linear and orthogonal up to the signs: the forward's gradient is the
    # inverse transform and vice versa ((M x H D / sqrt(p))^T = D (M^T x H) / sqrt(p))
    return torch.ops.hfquant.hadamard_transform(grad.contiguous(), ctx.signs, not ctx.inverse, ctx.mix), None, None, \
        None


torch.library.register_autograd("hfquant::hadamard_transform", _hadamard_backward, setup_context=_hadamard_setup)


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None = None, inverse: bool = False,
                       mix: torch.Tensor | None = None) -> torch.Tensor:
    """Fast Walsh-Hadamard transform of the last dimension p (a power of two), orthonormal:
    forward H (signs * x) / sqrt(p), inverse signs * (H x) / sqrt(p) (H the Sylvester matrix;
    signs float32 [p], normally random +-1, or None). With ``mix`` (float32 [m, m], orthonormal)
    the last dimension is m p: forward transforms the m sub-rows of p and mixes them by mix,
    inverse undoes it (one op for a rotation of size 2^k times a Paley order). Float32
    arithmetic, x's dtype out. Built on it: hfquant.algorithms.rotation.HadamardRotation."""
    if _backend() == "ref":
        return _ref().hadamard_transform_ref(x, signs, inverse, mix)
    return torch.ops.hfquant.hadamard_transform(x, signs, inverse, mix)


def hadamard_transform_inplace(x: torch.Tensor, signs: torch.Tensor | None = None, inverse: bool = False,
                               mix: torch.Tensor | None = None) -> None:
    """``hadamard_transform`` written into x (its last dimension contiguous)."""
    if _backend() == "ref":
        x.copy_(_ref().hadamard_transform_ref(x, signs, inverse, mix))
        return
    torch.ops.hfquant.hadamard_transform_inplace(x, signs, inverse, mix)


# --- fused decoder pieces ----------------------------------------------------------------------
@torch.library.register_fake("hfquant::rms_norm")
def _rms_norm_fake(x, weight, eps):
    torch._check(x.dim() >= 1, lambda: "hfquant::rms_norm: x must have at least one dimension, got a scalar")
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
                 lambda: f"hfquant::rms_norm: weight must be a vector of {x.shape[-1]} values (the last dimension "
                         f"of x), got shape {list(weight.shape)}")
    for name, t in (("x", x), ("weight", weight)):
        torch._check(t.dtype in (torch.float32, torch.bfloat16, torch.float16),
                     lambda: f"hfquant::rms_norm: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def _rms_norm_composite(x, weight, eps):
    """Devices without a native kernel (CUDA for now): the torch formula."""
    return _transforms.rms_norm(x, weight, eps)


torch.library.register_kernel("hfquant::rms_norm", "cuda", _rms_norm_composite)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dimension D as Llama-family decoders compute it: ``weight * (x *
    rsqrt(mean(x^2) + eps)).to(x.dtype)``, the mean and rsqrt in float32; x float32/bfloat16/
    float16 [..., D], weight [D]; the result in the dtype torch promotes x and weight to. No
    autograd (inference; hfquant.fusion keeps the module's own forward where gradients flow)."""
    if _backend() == "ref":
        return _ref().rms_norm_ref(x, weight, eps)
    return torch.ops.hfquant.rms_norm(x, weight, eps)


def kv_dequantize_rotated_into(codes, scales, mins, out: torch.Tensor, length: int, bits: int, group_size: int,
                               signs: torch.Tensor) -> None:
    """``kv_dequantize_into`` of per-token stores holding rotated states, each token rotated back
    in the same pass (``hadamard_transform(..., signs, inverse=True)``); head_dim a power of two."""
    if _backend() == "ref":
        return _ref().kv_dequantize_rotated_into_ref(codes, scales, mins, out, length, bits, group_size, signs)
    torch.ops.hfquant.kv_dequantize_rotated_into(codes, scales, mins, out, length, bits, group_size, signs)


# --- weight clustering (LUT kernel) -----------------------------------------------------------
@torch.library.register_fake("hfquant::lut_repack")
def _lut_repack_fake(qweight, codebook, bits, group_size, in_features):
    torch._check(bits in (2, 3, 4), lambda: f"hfquant::lut_repack: bits={bits} is not supported (use 2, 3 or 4)")
    N = qweight.shape[0]
    _, G = lut_group_geometry(group_size, in_features)
    Kp = round_up(in_features, LUT_UNIT_K)
    return (qweight.new_empty((N, Kp // 2), dtype=torch.uint8),
            codebook.new_empty((N, G, LUT_TABLE), dtype=torch.float32))


@torch.library.register_fake("hfquant::lut_linear")
def _lut_linear_fake(x, packed_indices, packed_codebook, bias, bits, group_size, out_features, in_features):
    torch._check(x.shape[-1] == in_features,
                 lambda: f"hfquant::lut_linear: x has last dimension {x.shape[-1]}, expected {in_features}")
    torch._check(x.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 lambda: f"hfquant::lut_linear: x must be float32, bfloat16 or float16, got {x.dtype}")
    return x.new_empty((*x.shape[:-1], out_features))


def lut_repack(qweight: torch.Tensor, codebook: torch.Tensor, bits: int, group_size: int,
               in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered-weight checkpoint tensors -> the LUT kernel layout (docs/formats.md).

    qweight: uint8 [N, ceil(K * bits / 8)] (bit-stream indices); codebook: floating
    [N, G, 2^bits]. Returns packed indices uint8 [N, Kp/2] (one nibble per index, Kp =
    round_up(K, 32)) and the packed codebook float32 [N, G, 16] (zero padded).
    """
    if _backend() == "ref":
        return _ref().lut_repack_ref(qweight, codebook, bits, group_size, in_features)
    return torch.ops.hfquant.lut_repack(qweight, codebook, bits, group_size, in_features)


def lut_linear(x: torch.Tensor, packed_indices: torch.Tensor, packed_codebook: torch.Tensor,
               bias: torch.Tensor | None, bits: int, group_size: int, out_features: int,
               in_features: int) -> torch.Tensor:
    """y = x @ W^T + bias, W[n, k] = codebook[n, group(k), index(n, k)]; x float32/bfloat16/float16 [..., K]."""
    if _backend() == "ref":
        return _ref().lut_linear_ref(x, packed_indices, packed_codebook, bias, bits, group_size, out_features,
                                      in_features)
    return torch.ops.hfquant.lut_linear(x, packed_indices, packed_codebook, bias, bits, group_size, out_features,
                                        in_features)
