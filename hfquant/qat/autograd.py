"""The backward pass of ``hfquant::qlinear``: gradients for x, the packed scales and bias.

y = x @ W^T + bias with W[n, k] = (v[n, k] - z[n, g]) * s[n, g], g = k's group. The integer
codes v are constants (the packed weight gets no gradient); the packed scales do, and
through them the checkpoint scales and zero points of a layer whose scales are trained
(scale-only fine-tuning, PEQA): ``packed_scales_from`` builds the kernel's scale layout
from scales and zeros with differentiable torch ops, bit-identical to ``hfquant::repack``.

The formula is registered as the op's autograd kernel (torch.library.register_autograd),
so every QuantLinear passes gradients to its input: LoRA adapters (peft) and QAT of other
layers train through frozen quantized layers.

    grad_x       = grad_y @ W
    grad_W       = grad_y^T @ x                       [N, K], never a parameter
    CPU layout   (plane 0: s, plane 1: s * (z + off)); W = (v + off) * p0 - p1
      grad_p0[n, g] = sum_{k in g} grad_W[n, k] * (v[n, k] + off)
      grad_p1[n, g] = -sum_{k in g} grad_W[n, k]
    CUDA layout  (plane 0: s, plane 1: z, asymmetric only); W = (v - z) * s
      grad_p0[n, g] = sum_{k in g} grad_W[n, k] * (v[n, k] - z[n, g])
      grad_p1[n, g] = -s[n, g] * sum_{k in g} grad_W[n, k]
    grad_bias    = grad_y summed over rows
"""
from __future__ import annotations

import torch

from ..formats.kernel_layouts import CUDA_ROW_PAD, NR, codes_from_packed, dequantize_packed, group_geometry, round_up


def _group_sum(t: torch.Tensor, group_size: int, G: int) -> torch.Tensor:
    """[N, K] -> [N, G]: sums over each group of ``group_size`` columns (the last may be short)."""
    N, K = t.shape
    gs = K if G == 1 else group_size
    if G * gs > K:
        t = torch.nn.functional.pad(t, (0, G * gs - K))
    return t.reshape(N, G, gs).sum(-1)


def _sym_zero(bits: int) -> float:
    # the zero point a symmetric layer's unsigned codes v are centred on
    return 8.0 if bits == 4 else 128.0


def packed_scales_from(scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                       device_layout: str = "cpu") -> torch.Tensor:
    """The kernel's packed_scales from checkpoint scales [N, G] and zero points [N, G]
    (None: symmetric), with differentiable torch ops; float zero points allowed (a trained
    zero point rounded with STE). Equal bit for bit to the second output of
    ``hfquant::repack`` (tests/training/test_qat_autograd.py)."""
    s = scales.to(torch.float32)
    N, G = s.shape
    if device_layout == "cuda":
        Np = round_up(N, CUDA_ROW_PAD)
        planes = [s] if zeros is None else [s, zeros.to(torch.float32)]
        ps = torch.stack([torch.nn.functional.pad(p.t(), (0, Np - N)) for p in planes], dim=1)  # [G, P, Np]
        return ps.contiguous()
    z = torch.full_like(s, _sym_zero(bits)) if zeros is None else zeros.to(torch.float32)
    off = 128.0 if bits == 4 else 0.0
    sb = torch.stack([s, s * (z + off)], dim=-1)  # [N, G, 2]
    T = -(-N // NR)
    sb = torch.nn.functional.pad(sb, (0, 0, 0, 0, 0, T * NR - N))
    return sb.reshape(T, NR, G, 2).permute(0, 2, 3, 1).contiguous()  # [T, G, 2, NR]


def _scales_planes(packed_scales: torch.Tensor, cuda_layout: bool, N: int):
    """(plane 0, plane 1 or None) as [N, G] from the packed scales of either layout."""
    if cuda_layout:
        p0 = packed_scales[:, 0, :N].t()
        p1 = packed_scales[:, 1, :N].t() if packed_scales.shape[1] == 2 else None
        return p0, p1
    T, G, _, NR = packed_scales.shape
    sb = packed_scales.permute(0, 3, 1, 2).reshape(T * NR, G, 2)[:N]
    return sb[..., 0], sb[..., 1]


def _to_packed_grad(g0: torch.Tensor, g1: torch.Tensor | None, packed_scales: torch.Tensor,
                    cuda_layout: bool) -> torch.Tensor:
    """[N, G] gradients of the planes -> a gradient shaped like packed_scales (0 on padding)."""
    N = g0.shape[0]
    if cuda_layout:
        out = torch.zeros_like(packed_scales)
        out[:, 0, :N] = g0.t()
        if g1 is not None and packed_scales.shape[1] == 2:
            out[:, 1, :N] = g1.t()
        return out
    T, G, _, NR = packed_scales.shape
    sb = torch.zeros(T * NR, G, 2, dtype=packed_scales.dtype, device=packed_scales.device)
    sb[:N, :, 0] = g0
    sb[:N, :, 1] = g1
    return sb.reshape(T, NR, G, 2).permute(0, 2, 3, 1).contiguous()


def qlinear_backward(grad_y: torch.Tensor, x: torch.Tensor, packed_weight: torch.Tensor,
                     packed_scales: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int,
                     out_features: int, in_features: int, needs=(True, False, True, False)):
    """(grad_x, grad_packed_scales, grad_bias) of qlinear; ``needs`` says which inputs
    (x, packed_weight, packed_scales, bias) want one (None where not). Pure torch, any
    float dtype: accumulates in the wider of float32 and the inputs' dtype."""
    N, K = out_features, in_features
    acc = torch.float64 if grad_y.dtype == torch.float64 or packed_scales.dtype == torch.float64 else torch.float32
    gy = grad_y.reshape(-1, N).to(acc)
    cuda_layout = packed_weight.dim() == 2
    grad_x = grad_ps = grad_b = None
    if needs[0]:
        w = dequantize_packed(packed_weight, packed_scales.to(acc), bits, group_size, N, K).to(acc)
        grad_x = (gy @ w).reshape(x.shape).to(x.dtype)
    if needs[2]:
        gw = gy.t() @ x.reshape(-1, K).to(acc)  # [N, K]
        _, G = group_geometry(group_size, K)
        v = codes_from_packed(packed_weight, bits)[:N, :K].to(acc)
        p0, p1 = _scales_planes(packed_scales.to(acc), cuda_layout, N)
        if cuda_layout:
            if p1 is None:
                z = torch.full_like(p0, _sym_zero(bits))
            else:
                z = p1
            gidx = torch.clamp(torch.arange(K, device=v.device) // (K if G == 1 else group_size), max=G - 1)
            g0 = _group_sum(gw * (v - z[:, gidx]), group_size, G)
            g1 = -p0 * _group_sum(gw, group_size, G) if p1 is not None else None
        else:
            off = 128.0 if bits == 4 else 0.0
            g0 = _group_sum(gw * (v + off), group_size, G)
            g1 = -_group_sum(gw, group_size, G)
        grad_ps = _to_packed_grad(g0, g1, packed_scales.to(acc), cuda_layout).to(packed_scales.dtype)
    if needs[3] and bias is not None:
        grad_b = gy.sum(0).to(bias.dtype)
    return grad_x, grad_ps, grad_b


def _setup_context(ctx, inputs, output):
    x, packed_weight, packed_scales, bias, bits, group_size, out_features, in_features = inputs
    ctx.save_for_backward(x, packed_weight, packed_scales, bias)
    ctx.args = (bits, group_size, out_features, in_features)


def _backward(ctx, grad_y):
    x, packed_weight, packed_scales, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    gx, gps, gb = qlinear_backward(grad_y, x, packed_weight, packed_scales, bias, *ctx.args, needs=needs)
    return gx, None, gps, gb, None, None, None, None


_REGISTERED = False


def register() -> None:
    """Registers the backward as the autograd kernel of hfquant::qlinear (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    torch.library.register_autograd("hfquant::qlinear", _backward, setup_context=_setup_context)
    _REGISTERED = True
