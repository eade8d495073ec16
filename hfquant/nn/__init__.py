from .base import PackedLinear
from .embedding import QuantEmbedding, TiedQuantLinear
from .experts import QuantExperts
from .int8_linear import Int8Linear
from .lut_linear import LutLinear
from .quant_linear import QuantLinear

__all__ = ["Int8Linear", "LutLinear", "PackedLinear", "QuantEmbedding", "QuantExperts", "QuantLinear", "TiedQuantLinear"]
