"""AWQ ("awq"): weight-only, activation-aware per-channel scales searched on calibration text
and folded into the previous op, then round to nearest (hfquant/algorithms/awq.py)."""
from __future__ import annotations

import dataclasses
from typing import Any

from .base import register_method
from .gptq import CalibratedMethod


@dataclasses.dataclass
class AwqSettings:
    calibration: dict[str, Any] | None = None
    clip_search: bool = True


@register_method
class Awq(CalibratedMethod):
    name = "awq"
    Settings = AwqSettings
    SETTING_TYPES = {"clip_search": "bool", "calibration": "dict"}
    NONE_OK = ("calibration",)

    def calibrate(self, model, targets, embeds, heads, tokenizer=None) -> None:
        from ..algorithms.awq import awq_model
        from ..experts import find_experts

        awq_model(model, self.config, targets, tokenizer, find_experts(model, self.config)[0])

    def short_name(self) -> str:
        return f"awq-{super().short_name()}"
