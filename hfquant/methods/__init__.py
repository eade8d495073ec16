"""Quantization methods: one module per method, one registry (``register_method``).

``HfQuantConfig(method=name)`` looks the class up here; see base.Method for the interface and
docs/adding_a_method.md for a worked example."""
import importlib as _importlib
import pkgutil as _pkgutil

# each module registers its method; the built-in ones first, in this order (method_names())
from . import rtn  # noqa: F401  isort: skip
from . import gptq  # noqa: F401  isort: skip
from . import awq  # noqa: F401  isort: skip
from . import llm_int8  # noqa: F401  isort: skip
from . import w8a8  # noqa: F401  isort: skip
from . import kmeans  # noqa: F401  isort: skip
from . import mixed  # noqa: F401  isort: skip

# any other module of this folder is a method too: adding one is adding its file
for _info in _pkgutil.iter_modules(__path__):
    if _info.name != "base":
        _importlib.import_module(f"{__name__}.{_info.name}")
from .base import (DEFAULT_CALIBRATION, FORMAT_VERSION, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, Method, get_method,
                   layer_tensor_keys, method_names, methods_taking, register_method)

__all__ = ["DEFAULT_CALIBRATION", "FORMAT_VERSION", "Method", "SUPPORTED_BITS", "SUPPORTED_GROUP_SIZES", "get_method",
           "layer_tensor_keys", "method_names", "methods_taking", "register_method"]
