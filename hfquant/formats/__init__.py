"""Named, versioned packed layouts. ``v1`` is checkpoint format version 1 (docs/formats.md)."""
from .v1 import (QuantizedWeight, code_range, dequantize, fake_quantize, group_params, pack_codes, pack_int4, quantize_codes,
                 quantize_rtn, unpack_int4, validate)

__all__ = ["QuantizedWeight", "code_range", "dequantize", "fake_quantize", "group_params", "pack_codes", "pack_int4", "quantize_codes",
           "quantize_rtn", "unpack_int4", "validate"]
