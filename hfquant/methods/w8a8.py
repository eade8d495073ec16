"""W8A8 ("w8a8"): int8 weights per output channel and int8 activations per token, both
quantized symmetrically; LLM.int8() without outlier columns. SmoothQuant or the norm-scale
fold may prepare the float model first."""
from __future__ import annotations

from .base import register_method
from .llm_int8 import LlmInt8


@register_method
class W8a8(LlmInt8):
    """The settings of LLM.int8 (fold_norms on by default for both: the choice on validation
    text, docs/accuracy.md, section defaults-validation); the threshold is not used."""

    name = "w8a8"
    why_not_exportable = "int8 activations quantized per token at run time"

    @property
    def threshold(self) -> float:
        return 0.0
