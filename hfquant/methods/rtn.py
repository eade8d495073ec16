"""Round to nearest ("rtn"): weight-only, quantized while the weights load, no data."""
from __future__ import annotations

import torch
from torch import nn

from .. import formats
from ..nn import QuantLinear
from .base import Method, register_method

# Rows quantized at a time while loading: quantize_rtn's float32 temporaries stay ~1 MB
# each however large the layer (rows are quantized independently, so the result is the same).
# 4 MB blocks let the handful of eager temporaries of one block (w, w / s, round, clamp,
# codes) reach 20-45 MB together: a heap transient that made the cold load's peak vary
# between 100 and 155 MiB above its base in tests/reliability/test_memory_bound.py; at 1 MB it
# is 95 MiB in every run, and loading is no slower.
_ROW_BLOCK_ELEMENTS = 1 << 18


def quantize_by_rows(w, quantize) -> formats.QuantizedWeight:
    """``quantize`` (a float weight [n, in] -> QuantizedWeight) applied to blocks of rows of
    ``w`` [out, in] and concatenated: the same result (rows are quantized independently) with
    float32 temporaries of ~1 MB however large the layer."""
    rows = max(1, _ROW_BLOCK_ELEMENTS // max(1, w.shape[1]))
    if w.shape[0] <= rows:
        return quantize(w)
    parts = [quantize(w[i:i + rows]) for i in range(0, w.shape[0], rows)]
    p0 = parts[0]
    zeros = None if p0.zeros is None else torch.cat([p.zeros for p in parts])
    return formats.QuantizedWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                                   zeros, p0.bits, p0.group_size, w.shape[1])


def quantize_rtn_by_rows(w, bits, group_size, symmetric, scale_dtype) -> formats.QuantizedWeight:
    return quantize_by_rows(w, lambda rows: formats.quantize_rtn(rows, bits, group_size, symmetric,
                                                                 scale_dtype=scale_dtype))


@register_method
class Rtn(Method):
    """Each group of ``group_size`` input columns of a row gets a scale (and a zero point when
    asymmetric) from its range; codes are rounded to the nearest step."""

    name = "rtn"
    layer_class = QuantLinear
    embeddings = True
    qat = True
    export_formats = ("gptq", "compressed-tensors")
    tensor_keys = ("qweight", "scales", "zeros", "perm")
    w8_group_size = -1  # what the README calls W8: one scale per output channel

    @property
    def act_order(self) -> bool:
        """Whether the layers carry a column permutation (GPTQ act-order)."""
        return False

    def empty_layer(self, name, in_features, out_features, bias, **common) -> nn.Module:
        s = self.config.scheme_for(name)
        return QuantLinear(in_features, out_features, bias, s["bits"], s["group_size"], s["symmetric"],
                           act_order=self.act_order, **common)

    def quantize_weight(self, name, module, weight) -> dict:
        q = quantize_rtn_by_rows(weight, module.bits, module.group_size, module.symmetric, module.scales.dtype)
        out = {"qweight": q.qweight, "scales": q.scales}
        if q.zeros is not None:
            out["zeros"] = q.zeros
        return out

    def quantize_layer(self, name, module, transposed) -> nn.Module:
        s = self.config.scheme_for(name)
        return QuantLinear.from_float(module, s["bits"], s["group_size"], s["symmetric"], transposed=transposed,
                                      act_order=self.act_order)
