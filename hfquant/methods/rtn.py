"""Round to nearest ("rtn"): weight-only, quantized while the weights load, no data."""
from __future__ import annotations

import dataclasses

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
    offsets = None if p0.offsets is None else torch.cat([p.offsets for p in parts])
    return formats.QuantizedWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                                   zeros, p0.bits, p0.group_size, w.shape[1], offsets=offsets)


def quantize_rtn_by_rows(w, bits, group_size, symmetric, scale_dtype, grid="range",
                         zero_point="integer") -> formats.QuantizedWeight:
    return quantize_by_rows(w, lambda rows: formats.quantize_rtn(rows, bits, group_size, symmetric,
                                                                 scale_dtype=scale_dtype, grid=grid,
                                                                 zero_point=zero_point))


@dataclasses.dataclass
class RtnSettings:
    # how a symmetric grid is placed ("range", "extreme", "best") and an asymmetric grid's zero
    # point ("integer", "float"): formats.v1.group_params / offset_params; "best" chosen on
    # validation text (docs/accuracy.md, defaults-validation)
    grid: str = "best"
    zero_point: str = "integer"


@register_method
class Rtn(Method):
    """Each group of ``group_size`` input columns of a row gets a scale (and a zero point when
    asymmetric) from its range; codes are rounded to the nearest step."""

    name = "rtn"
    Settings = RtnSettings
    SETTING_TYPES = {"grid": "str", "zero_point": "str"}
    version1_settings = {"grid": "range", "zero_point": "integer"}
    layer_class = QuantLinear
    embeddings = True
    qat = True
    export_formats = ("gptq", "compressed-tensors")
    tensor_keys = ("qweight", "scales", "zeros", "offsets", "perm")
    w8_group_size = -1  # what the README calls W8: one scale per output channel
    experts = True

    @property
    def act_order(self) -> bool:
        """Whether the layers carry a column permutation (GPTQ act-order)."""
        return False

    def check_settings(self) -> None:
        super().check_settings()
        c, g = self.config, self.grid_args()
        if g["grid"] not in formats.GRIDS:
            raise ValueError(f"HfQuantConfig: grid={g['grid']!r} is not supported (use one of {formats.GRIDS})")
        if g["zero_point"] not in formats.ZERO_POINTS:
            raise ValueError(f"HfQuantConfig: zero_point={g['zero_point']!r} is not supported "
                             f"(use one of {formats.ZERO_POINTS})")
        if g["zero_point"] != "integer" and c.symmetric:
            raise ValueError(f"HfQuantConfig: zero_point={g['zero_point']!r} applies to asymmetric schemes; "
                             f"set symmetric=False")

    def format_version(self) -> int:
        """2 where a layer's scheme uses a version 2 grid: ``grid`` on a symmetric scheme below 8
        bits, ``zero_point="float"`` on an asymmetric one (the global scheme or an override)."""
        g, c = self.grid_args(), self.config
        for s in [c.scheme_for("")] + [c.scheme_for(k) for k in c.modules_override]:
            if s["symmetric"] and s["bits"] < 8 and g["grid"] != "range":
                return 2
            if not s["symmetric"] and g["zero_point"] != "integer":
                return 2
        return 1

    def empty_layer(self, name, in_features, out_features, bias, **common) -> nn.Module:
        s = self.config.scheme_for(name)
        return QuantLinear(in_features, out_features, bias, s["bits"], s["group_size"], s["symmetric"],
                           act_order=self.act_order, **self.grid_args(), **common)

    def quantize_weight(self, name, module, weight) -> dict:
        q = quantize_rtn_by_rows(weight, module.bits, module.group_size, module.symmetric, module.scales.dtype,
                                 getattr(module, "grid", "range"), getattr(module, "zero_point", "integer"))
        out = {"qweight": q.qweight, "scales": q.scales}
        if q.zeros is not None:
            out["zeros"] = q.zeros
        if q.offsets is not None:
            out["offsets"] = q.offsets
        return out

    def quantize_layer(self, name, module, transposed) -> nn.Module:
        s = self.config.scheme_for(name)
        return QuantLinear.from_float(module, s["bits"], s["group_size"], s["symmetric"], transposed=transposed,
                                      act_order=self.act_order, **self.grid_args())
