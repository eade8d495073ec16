"""GPTQ ("gptq"): weight-only, second-order error compensation calibrated layer by layer
(hfquant/algorithms/gptq.py), stored in format v1 with an optional column permutation."""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..nn import QuantExperts, QuantLinear
from .base import check_number, register_method
from .rtn import Rtn

# GPTQ and AWQ calibrate on more windows by default (the papers' 128)
CALIBRATED_SAMPLES = 128


@dataclasses.dataclass
class GptqSettings:
    calibration: dict[str, Any] | None = None
    act_order: bool = True
    damp: float = 0.01
    clip_search: bool = True


class CalibratedMethod(Rtn):
    """A weight-only method calibrated on text after the float model loaded."""

    qat = False
    experts = True  # each expert calibrated on the tokens routed to it (subclasses say otherwise)

    @classmethod
    def default_samples(cls, values) -> int:
        return CALIBRATED_SAMPLES

    def needs_float_model(self) -> bool:
        return True


@register_method
class Gptq(CalibratedMethod):
    name = "gptq"
    Settings = GptqSettings
    SETTING_TYPES = {"act_order": "bool", "clip_search": "bool", "damp": "number", "calibration": "dict"}
    NONE_OK = ("calibration",)

    def __init__(self, config):
        super().__init__(config)
        self.results = {}

    def check_settings(self) -> None:
        super().check_settings()
        check_number("damp", self.settings.damp, 0, 1, low_open=True)

    @property
    def act_order(self) -> bool:
        return self.settings.act_order

    def calibrate(self, model, targets, embeds, heads, tokenizer=None) -> None:
        from ..algorithms.gptq import gptq_model
        from ..experts import find_experts

        experts = find_experts(model, self.config)[0] if self.experts else []
        self.results = gptq_model(model, self.config, targets, tokenizer, experts)

    def quantize_layer(self, name, module, transposed) -> nn.Module:
        r = self.results.pop(name, None)
        if r is None:  # outside the decoder blocks GPTQ walks: round to nearest, identity permutation
            return super().quantize_layer(name, module, transposed)
        return QuantLinear.from_quantized(r.quantized, module.bias, r.perm, act_order=self.act_order)

    def quantize_experts_module(self, name, module, num_experts) -> nn.Module:
        r = self.results.pop(name, None)
        if r is None:  # outside the decoder blocks GPTQ walks: round to nearest
            return super().quantize_experts_module(name, module, num_experts)
        s = self.config.scheme_for(name)

        def stored(key, layer, w):  # key: "<module>.<proj>_proj.<expert>"
            proj, e = key[len(name) + 1:].rsplit(".", 1)
            q = r.quantized[proj.removesuffix("_proj")][int(e)]
            return {"qweight": q.qweight, "scales": q.scales, **({} if q.zeros is None else {"zeros": q.zeros})}

        return QuantExperts.from_float(module, num_experts, s["bits"], s["group_size"], s["symmetric"],
                                       quantize=stored, name=name)

    def short_name(self) -> str:
        return f"gptq-{super().short_name()}"
