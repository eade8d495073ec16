"""Checkpoint interchange with other quantized formats: export to GPTQ and
compressed-tensors, import (convert) from GPTQ, AWQ and compressed-tensors."""
from .export import FORMATS as EXPORT_FORMATS, ExportError, export_model

__all__ = ["EXPORT_FORMATS", "ExportError", "export_model"]
from .convert import SOURCES as IMPORT_SOURCES, ConvertError, convert_checkpoint  # noqa: E402

__all__ += ["IMPORT_SOURCES", "ConvertError", "convert_checkpoint"]
