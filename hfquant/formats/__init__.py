"""Named, versioned packed layouts. ``v1`` is checkpoint format version 1 (docs/formats.md)."""
from .v1 import QuantizedWeight, dequantize, pack_int4, quantize_rtn, unpack_int4, validate

__all__ = ["QuantizedWeight", "dequantize", "pack_int4", "quantize_rtn", "unpack_int4", "validate"]
