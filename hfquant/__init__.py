"""hfquant: INT8/INT4 quantization for Hugging Face transformers.

``import hfquant`` registers the ``"hfquant"`` quantization method with transformers.
"""
from __future__ import annotations

import os as _os
import sys as _sys


def _load() -> None:
    """Loads the native ops and the public API, and registers "hfquant" with transformers (once)."""
    global HfQuantConfig, QuantizedKVCache, Int8Linear, LutLinear, QuantLinear, FakeQuantLinear, convert
    global enable_scale_training, prepare_qat, register_lora, settings, save_pretrained, quantized_cache, __version__
    from . import _ext  # loads the native ops
    from .runtime import settings  # the kernel and backend switches, seeded from HFQUANT_* variables
    from .config import HfQuantConfig
    from .fileio import save_pretrained
    from .kv_cache import QuantizedKVCache, quantized_cache
    from .nn import Int8Linear, LutLinear, QuantLinear
    from .qat import FakeQuantLinear, convert, enable_scale_training, prepare_qat, register_lora

    __version__ = _ext._C.__version__
    _register()


def _cli_starting() -> bool:
    """Whether this process is the `hfquant` command starting (its console script, or `python -m
    hfquant.cli`). The command then parses its arguments and checks its paths before torch and
    transformers load (so `--help` answers at once), and calls _load() before any work."""
    argv = getattr(_sys, "orig_argv", None) or []
    if _sys.argv[:1] == ["-m"]:  # runpy imports the package while it locates the module
        return any(a == "-m" and argv[i + 1:i + 2] == ["hfquant.cli"] or a == "-mhfquant.cli"
                   for i, a in enumerate(argv))
    script = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    return script in ("hfquant", "hfquant.exe", "hfquant-script.py")


_LOADED_NAMES = ("HfQuantConfig", "QuantizedKVCache", "Int8Linear", "LutLinear", "QuantLinear", "FakeQuantLinear",
                 "convert", "enable_scale_training", "prepare_qat", "register_lora", "settings", "save_pretrained", "quantized_cache",
                 "__version__")


def __getattr__(name: str):
    # only while the command starts (see _cli_starting): the public API loads on first use
    if name in _LOADED_NAMES:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'hfquant' has no attribute {name!r}")


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


if not _cli_starting():
    _load()


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
           "FakeQuantLinear", "convert", "enable_scale_training", "prepare_qat", "register_lora", "settings",
           "save_pretrained", "quantized_cache"]
