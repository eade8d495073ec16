"""Round to nearest with an MSE clip search ("rtn_mse"): weight-only and data-free like "rtn",
but each group's range is shrunk by the factor (1, 0.95, ..., 1 - max_shrink) that minimises
the group's squared weight error before rounding. Quantized while the weights load; the
checkpoint is format v1 and reloads as any "rtn" one does.

On the default model it measures worse than "rtn" at every max_shrink tried (docs/accuracy.md,
section defaults-validation): the weight-space error clips the large weights that meet the
large activations. GPTQ runs the same search weighted by the Hessian diagonal, which helps.
The method stays as the worked example of docs/adding_a_method.md (a method is one module
here) and as a measured negative result.
"""
from __future__ import annotations

import dataclasses
import functools

from torch import nn

from .. import formats
from ..algorithms.gptq import search_clip
from ..formats.v1 import grouped
from ..nn import QuantLinear
from .base import check_number, register_method
from .rtn import Rtn, quantize_by_rows


@dataclasses.dataclass
class RtnMseSettings:
    # candidate factors 1 - i / clip_steps for i = 0 .. max_shrink * clip_steps
    clip_steps: int = 20
    max_shrink: float = 0.1  # the least bad on validation text (docs/accuracy.md)


@register_method
class RtnMse(Rtn):
    name = "rtn_mse"
    Settings = RtnMseSettings
    SETTING_TYPES = {"clip_steps": "int", "max_shrink": "number"}
    qat = False
    why_not_qat = "QAT starts from round to nearest; train with method='rtn' and the same scheme"

    def check_settings(self) -> None:
        super().check_settings()
        if self.settings.clip_steps < 1:
            raise ValueError(f"HfQuantConfig: clip_steps={self.settings.clip_steps!r} must be an integer >= 1")
        check_number("max_shrink", self.settings.max_shrink, 0, 1, low_open=False)
        if self.settings.max_shrink >= 1:
            raise ValueError(f"HfQuantConfig: max_shrink={self.settings.max_shrink!r} must be below 1 "
                             "(a group shrunk to nothing)")

    def quantize(self, weight, bits: int, group_size: int, symmetric: bool, scale_dtype) -> formats.QuantizedWeight:
        """Format v1 tensors of one float weight [out, in], the clip factor searched per group."""
        s = self.settings
        w = grouped(weight.detach().float(), group_size)
        clip = search_clip(w, None, bits, symmetric, scale_dtype, steps=s.clip_steps, max_shrink=s.max_shrink)
        return formats.quantize_rtn(weight, bits, group_size, symmetric, scale_dtype=scale_dtype, clip=clip)

    def quantize_weight(self, name, module, weight) -> dict:
        q = quantize_by_rows(weight, functools.partial(self.quantize, bits=module.bits, group_size=module.group_size,
                                                       symmetric=module.symmetric, scale_dtype=module.scales.dtype))
        return {"qweight": q.qweight, "scales": q.scales, **({} if q.zeros is None else {"zeros": q.zeros})}

    def quantize_layer(self, name, module, transposed) -> nn.Module:
        sch = self.config.scheme_for(name)
        w = module.weight.t() if transposed else module.weight
        q = self.quantize(w, sch["bits"], sch["group_size"], sch["symmetric"], module.weight.dtype)
        return QuantLinear.from_quantized(q, module.bias)

    def short_name(self) -> str:
        return f"mse-{super().short_name()}"
