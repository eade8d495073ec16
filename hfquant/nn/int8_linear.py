"""Int8Linear: int8 weights with int8 activations (W8A8 dynamic, LLM.int8()), on hfquant::int8_linear."""
from __future__ import annotations

import torch
from torch import nn

from .. import formats, ops
from ..formats.kernel_layouts import int8_weight_from_packed
from .base import PackedLinear


class Int8Linear(PackedLinear):
    """A Linear layer with per-channel symmetric int8 weights whose input is quantized per
    token (row) at run time, and multiplied with an exact int8 x int8 -> int32 GEMM.

    threshold = 0: W8A8 dynamic. threshold > 0: LLM.int8(): input columns holding a value
    with |x| >= threshold (or NaN/Inf) are multiplied in floating point with the matching
    weight columns, dequantized on the fly, and added.
    With ``smooth`` (SmoothQuant factors s [in_features] that could not be folded into a
    previous op), the input is divided by s inside the op; the weights already hold W * s.

    Checkpoint tensors (format v1, 8-bit symmetric per channel): qweight int8 [out, in],
    scales [out, 1] in the model's dtype, smooth float32 [in] (optional), bias.
    """

    _state_order = ("qweight", "scales", "smooth", "bias")
    bits, group_size, symmetric = 8, -1, True

    def __init__(self, in_features: int, out_features: int, bias: bool, threshold: float = 0.0,
                 smooth: bool = False, dtype: torch.dtype = torch.float32, device=None,
                 float_weight_shape: tuple[int, int] | None = None, float_weight_transposed: bool = False):
        super().__init__()
        if not threshold >= 0:
            raise ValueError(f"hfquant: Int8Linear threshold={threshold} must be >= 0")
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = float(threshold)
        self.float_weight_transposed = float_weight_transposed
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, 1, dtype=dtype, device=device))
        if smooth:
            self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device))
        else:
            self.smooth = None
        self.zeros = None
        self._init_bias_and_placeholder(bias, dtype, device, float_weight_shape)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Module, threshold: float = 0.0, smooth: torch.Tensor | None = None,
                   transposed: bool = False) -> "Int8Linear":
        """Quantizes an nn.Linear (or a Conv1D-style [in, out] weight with transposed=True).
        ``smooth``: SmoothQuant factors s whose product W * s the weight already holds."""
        w = linear.weight.detach()
        if transposed:
            w = w.t()
        out_features, in_features = w.shape
        q = formats.quantize_rtn(w, 8, -1, True)
        mod = cls(in_features, out_features, linear.bias is not None, threshold, smooth is not None,
                  dtype=w.dtype, device=w.device)
        mod.load_quantized(q.qweight, q.scales, None)
        if smooth is not None:
            mod.smooth = smooth.detach().to(device=w.device, dtype=torch.float32).clone()
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def load_quantized(self, qweight, scales, zeros=None) -> None:
        if zeros is not None:
            raise ValueError("hfquant: Int8Linear weights are symmetric (no zero points)")
        self.qweight = qweight
        self.scales = scales
        self._packed = False

    def validate(self, name: str = "") -> None:
        name = name or type(self).__name__
        formats.validate(name, self._canonical_qweight(), self.scales, None, 8, -1, self.in_features,
                         self.out_features, True)
        if self.smooth is not None:
            s = self.smooth
            if tuple(s.shape) != (self.in_features,) or not s.is_floating_point():
                raise ValueError(f"hfquant: {name}.smooth has shape {tuple(s.shape)} and dtype {s.dtype}; "
                                 f"expected ({self.in_features},) floating point")
            if not (torch.isfinite(s).all() and (s > 0).all()):
                raise ValueError(f"hfquant: {name}.smooth must hold finite positive factors")

    # -- kernel layout ----------------------------------------------------------------
    def _kernel_tensors(self) -> dict[str, torch.Tensor]:
        pw, colsum = ops.int8_pack(self.qweight)
        out = {"packed_weight": pw, "colsum": colsum,
               "w_scales": self.scales.detach().to(torch.float32).reshape(-1).contiguous()}
        if self.smooth is not None:
            out["act_scale"] = (1.0 / self.smooth.detach().to(torch.float32)).contiguous()
        return out

    def _qweight_from_kernel(self) -> torch.Tensor:
        return int8_weight_from_packed(self.packed_weight, self.out_features, self.in_features)

    # -- compute ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kernel()
        return ops.int8_linear(x, k["packed_weight"], k["colsum"], k["w_scales"], self.bias,
                               k.get("act_scale"), self.threshold, self.out_features)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in] of the layer, the smoothing undone (W * s / s)."""
        dtype = dtype or self.scales.dtype
        w = self._canonical_qweight().to(torch.float32) * self.scales.to(torch.float32)
        if self.smooth is not None:
            w = w / self.smooth.to(torch.float32)
        return w.to(dtype)

    def extra_repr(self) -> str:
        mode = f"llm_int8 threshold={self.threshold}" if self.threshold > 0 else "w8a8"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{mode}{', smoothed' if self.smooth is not None else ''}")
