"""hfquant: INT8/INT4 quantization for Hugging Face transformers.

``import hfquant`` registers the ``"hfquant"`` quantization method with transformers.
"""
from __future__ import annotations

from . import _ext  # noqa: F401  (loads the native ops)
from .config import HfQuantConfig
from .kv_cache import QuantizedKVCache
from .nn import Int8Linear, LutLinear, QuantLinear
from .qat import FakeQuantLinear, convert, enable_scale_training, prepare_qat

__version__ = _ext._C.__version__


def _register() -> None:
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)

    from .quantizer import HfQuantQuantizer

    # A second registration raises in transformers: register once per process.
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get("hfquant") is not HfQuantConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop("hfquant", None)
        register_quantization_config("hfquant")(HfQuantConfig)
    if AUTO_QUANTIZER_MAPPING.get("hfquant") is not HfQuantQuantizer:
        AUTO_QUANTIZER_MAPPING.pop("hfquant", None)
        register_quantizer("hfquant")(HfQuantQuantizer)


_register()


def quantize_model(model, config: HfQuantConfig | None = None, tokenizer=None, **kwargs):
    """Quantizes the nn.Linear (and Conv1D) layers of a model in place, and returns it.

    Works for any nn.Module. For a transformers model the result saves with
    ``save_pretrained`` and reloads with ``from_pretrained`` like one quantized on load.
    ``tokenizer`` serves calibrating methods (SmoothQuant, GPTQ, AWQ); by default the one saved beside
    the model is loaded.
    """
    from .quantizer import attach_quantizer
    from .replace import quantize_in_place

    if config is None:
        config = HfQuantConfig(**kwargs)
    elif kwargs:
        raise ValueError("quantize_model: pass either a config or keyword settings, not both")
    attach_quantizer(model, config, quantize_in_place(model, config, tokenizer))
    return model


__all__ = ["HfQuantConfig", "Int8Linear", "LutLinear", "QuantLinear", "QuantizedKVCache", "quantize_model", "__version__",
           "FakeQuantLinear", "convert", "enable_scale_training", "prepare_qat"]
