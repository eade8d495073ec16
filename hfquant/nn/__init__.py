from .base import PackedLinear
from .embedding import QuantEmbedding, TiedQuantLinear
from .int8_linear import Int8Linear
from .lut_linear import LutLinear
from .quant_linear import QuantLinear

__all__ = ["Int8Linear", "LutLinear", "PackedLinear", "QuantEmbedding", "QuantLinear", "TiedQuantLinear"]
