"""Mixed precision ("mixed"): bits per layer chosen from sensitivity under an average-bits
budget (hfquant/algorithms/mixed.py), each layer then quantized by round to nearest or GPTQ.
The choice is written into ``modules_override``, so the checkpoint reloads without calibration."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .base import SUPPORTED_BITS, register_method
from .gptq import CALIBRATED_SAMPLES, Gptq

MIXED_SENSITIVITIES = ("fisher", "variance")
MIXED_BASES = ("rtn", "gptq")
DEFAULT_MIXED_SAMPLES = 16


@dataclasses.dataclass
class MixedSettings:
    calibration: dict[str, Any] | None = None
    target_bits: float = 4.5
    mixed_bits: list[int] = dataclasses.field(default_factory=lambda: [2, 3, 4, 8])
    sensitivity: str = "fisher"
    mixed_base: str = "rtn"
    clip_search: bool = True
    act_order: bool = True
    damp: float = 0.01


@register_method
class Mixed(Gptq):
    name = "mixed"
    Settings = MixedSettings
    SETTING_TYPES = {**Gptq.SETTING_TYPES, "target_bits": "number", "mixed_bits": "ints", "sensitivity": "str",
                     "mixed_base": "str"}
    NONE_OK = ("calibration", "mixed_bits")
    embeddings_default = True
    writes_overrides = True
    w8_group_size = None  # its bits vary per layer
    experts = False  # its bit allocation does not cover fused MoE experts

    @classmethod
    def default_samples(cls, values) -> int:
        return CALIBRATED_SAMPLES if values.get("mixed_base") == "gptq" else DEFAULT_MIXED_SAMPLES

    def check_settings(self) -> None:
        super().check_settings()
        s = self.settings
        mb = s.mixed_bits
        if not isinstance(mb, (list, tuple)) or not mb or any(isinstance(b, bool) or b not in SUPPORTED_BITS
                                                              for b in mb) or len(set(mb)) != len(mb):
            raise ValueError(f"HfQuantConfig: mixed_bits={mb!r} must be a list of distinct bit widths among "
                             f"{SUPPORTED_BITS}")
        t = s.target_bits
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < min(mb):
            raise ValueError(f"HfQuantConfig: target_bits={t!r} is impossible: every layer takes at least "
                             f"{min(mb)} bits per weight (plus scales) with mixed_bits={mb}")
        if s.sensitivity not in MIXED_SENSITIVITIES:
            raise ValueError(f"HfQuantConfig: sensitivity={s.sensitivity!r} is not supported "
                             f"(use one of {MIXED_SENSITIVITIES})")
        if s.mixed_base not in MIXED_BASES:
            raise ValueError(f"HfQuantConfig: mixed_base={s.mixed_base!r} is not supported (use one of {MIXED_BASES})")

    @property
    def act_order(self) -> bool:
        return self.settings.mixed_base == "gptq" and self.settings.act_order

    def calibrate(self, model, targets, embeds, heads, tokenizer=None) -> None:
        from ..algorithms.mixed import allocate_bits

        allocate_bits(model, self.config, targets, embeds, heads, tokenizer)
        if self.settings.mixed_base == "gptq":
            super().calibrate(model, targets, embeds, heads, tokenizer)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.settings.mixed_base != "gptq":
            del d["act_order"], d["damp"]
        return d

    def short_name(self) -> str:
        c = self.config
        g = "c" if c.group_size == -1 else f"g{c.group_size}"
        base = "" if self.settings.mixed_base == "rtn" else f"-{self.settings.mixed_base}"
        return f"mixed{self.settings.target_bits:g}{g}{'' if c.symmetric else 'a'}{base}"

    @classmethod
    def describe(cls, q: dict) -> str:
        return f"bits per layer (target {q.get('target_bits')} bits per weight); see bits_per_layer"
