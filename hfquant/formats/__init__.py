"""Named, versioned packed layouts. ``v1`` is checkpoint format version 1 (docs/formats.md);
``lut`` holds the tensors of weight clustering (method "kmeans") in the same version."""
from .lut import dequantize_lut, pack_indices, unpack_indices, validate_lut
from .v1 import (GRIDS, ZERO_POINTS, QuantizedWeight, code_range, codes_and_zeros, dequantize, fake_quantize,
                 group_params, offset_codes, offset_params, pack_bits,
                 pack_codes, pack_int4, quantize_codes, quantize_rtn, unpack_bits, unpack_int4, validate)

__all__ = ["GRIDS", "ZERO_POINTS", "offset_codes", "offset_params", "QuantizedWeight", "code_range", "codes_and_zeros", "dequantize", "dequantize_lut", "fake_quantize", "group_params",
           "pack_bits", "pack_codes", "pack_indices", "pack_int4", "quantize_codes", "quantize_rtn", "unpack_bits",
           "unpack_indices",
           "unpack_int4", "validate", "validate_lut"]
