from .base import PackedLinear
from .int8_linear import Int8Linear
from .quant_linear import QuantLinear

__all__ = ["Int8Linear", "PackedLinear", "QuantLinear"]
