"""W8A8 ("w8a8"): int8 weights per output channel and int8 activations per token, both
quantized symmetrically; LLM.int8() without outlier columns. SmoothQuant or the norm-scale
fold may prepare the float model first."""
from __future__ import annotations

import dataclasses

from .base import register_method
from .llm_int8 import Int8Settings, LlmInt8


@dataclasses.dataclass
class W8a8Settings(Int8Settings):
    # measured on the default model: folding the norms helps LLM.int8 and not W8A8
    # (docs/accuracy.md, section defaults-validation)
    fold_norms: bool = False


@register_method
class W8a8(LlmInt8):
    name = "w8a8"
    Settings = W8a8Settings
    why_not_exportable = "int8 activations quantized per token at run time"

    @property
    def threshold(self) -> float:
        return 0.0
