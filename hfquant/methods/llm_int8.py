"""LLM.int8() ("llm_int8"): int8 weights per output channel, int8 activations per token
quantized at run time, and the input columns holding an outlier (|x| >= threshold)
multiplied in floating point. Optionally SmoothQuant or the norm-scale fold prepare the
float model first (hfquant/algorithms/smoothquant.py).

Fused MoE experts (hfquant.nn.QuantExperts) get the same int8 per-channel weights, multiplied
weight-only: the routed-expert op has no int8-activation path, so the experts' activations stay
in floating point (more accurate than int8 activations, and the same bytes read per token)."""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..nn import Int8Linear
from .rtn import quantize_rtn_by_rows
from .base import Method, check_number, register_method


@dataclasses.dataclass
class Int8Settings:
    llm_int8_threshold: float = 6.0
    smoothquant_alpha: float | None = None
    fold_norms: bool = True
    calibration: dict[str, Any] | None = None
    # filled when SmoothQuant runs: modules whose factors are applied inside the op (stored as
    # <module>.smooth) because no previous op could absorb them
    smooth_modules: list[str] = dataclasses.field(default_factory=list)


@register_method
class LlmInt8(Method):
    name = "llm_int8"
    Settings = Int8Settings
    SETTING_TYPES = {"llm_int8_threshold": "number", "smoothquant_alpha": "number", "fold_norms": "bool",
                     "calibration": "dict", "smooth_modules": "names"}
    NONE_OK = ("smoothquant_alpha", "calibration", "smooth_modules", "fold_norms")
    layer_class = Int8Linear
    default_bits = 8
    default_group_size = -1
    per_module_schemes = False
    trainable = False
    why_not_trainable = why_not_qat = "it quantizes activations at run time"
    why_not_exportable = "int8 activations with LLM.int8() outlier columns in floating point"
    tensor_keys = ("qweight", "scales", "smooth")
    experts = True  # weight-only int8 (module docstring)

    def __init__(self, config):
        super().__init__(config)
        self.smooth = {}

    @property
    def threshold(self) -> float:
        """The outlier threshold the layers run with (0: plain W8A8)."""
        return float(self.settings.llm_int8_threshold)

    def check_settings(self) -> None:
        super().check_settings()
        s, c = self.settings, self.config
        if c.bits != 8 or c.group_size != -1 or not c.symmetric:
            raise ValueError(f"HfQuantConfig: method={self.name!r} uses int8 symmetric per-channel weights: set "
                             f"bits=8, group_size=-1, symmetric=True (got bits={c.bits}, group_size={c.group_size}, "
                             f"symmetric={c.symmetric})")
        t = s.llm_int8_threshold
        if not t >= 0:
            raise ValueError(f"HfQuantConfig: llm_int8_threshold={t!r} must be a number >= 0 "
                             "(0 turns outlier detection off)")
        if s.smoothquant_alpha is not None:
            check_number("smoothquant_alpha", s.smoothquant_alpha, 0, 1)

    def needs_float_model(self) -> bool:
        return self.settings.smoothquant_alpha is not None or self.settings.fold_norms

    def calibrate(self, model, targets, embeds, heads, tokenizer=None) -> None:
        from ..algorithms.smoothquant import prepare_float_model

        self.smooth = prepare_float_model(model, self.config, tokenizer)
        self.settings.smooth_modules = sorted(self.smooth)

    def empty_layer(self, name, in_features, out_features, bias, **common) -> nn.Module:
        return Int8Linear(in_features, out_features, bias, self.threshold,
                          smooth=self.config.is_listed(name, self.settings.smooth_modules), **common)

    def quantize_weight(self, name, module, weight) -> dict:
        # int8 per channel, symmetric: round to nearest, row block by row block
        q = quantize_rtn_by_rows(weight, 8, -1, True, module.scales.dtype)
        return {"qweight": q.qweight, "scales": q.scales}

    def quantize_layer(self, name, module, transposed) -> nn.Module:
        return Int8Linear.from_float(module, self.threshold, self.smooth.get(name), transposed=transposed)

    def short_name(self) -> str:
        a = self.settings.smoothquant_alpha
        return self.name + ("" if a is None else f"-sq{a:g}")

    @classmethod
    def describe(cls, q: dict) -> str:
        return "int8 weights, one scale per output channel; int8 activations, one scale per token"
