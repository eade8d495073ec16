"""LoRA adapters on QuantLinear layers through peft (QLoRA-style fine-tuning on a quantized base).

peft picks a LoRA layer class for each target module and rejects module types it does not
know; a LoraConfig takes extra layer types through peft's custom-module mapping.
``register_lora(config)`` adds {QuantLinear: QuantLoraLinear} to a LoraConfig and returns it,
for ``get_peft_model``, ``PeftModel.from_pretrained(..., config=...)``, and transformers'
``add_adapter`` / ``load_adapter(..., peft_config=...)``. Nothing in peft is changed. The base
layer stays frozen and quantized; its op passes gradients to its input
(hfquant/qat/autograd.py), so adapters in every layer train. Adapters save and load with
peft's own save_pretrained / PeftModel.from_pretrained on top of the quantized checkpoint.
"""
from __future__ import annotations

import torch

from ..nn import QuantLinear

_layer_cls = None


def _make_layer_class():
    """QuantLoraLinear, built on first use (it subclasses peft's LoraLayer)."""
    global _layer_cls
    if _layer_cls is not None:
        return _layer_cls
    from peft.tuners.lora.layer import LoraLayer

    class QuantLoraLinear(torch.nn.Module, LoraLayer):
        """LoRA adapters beside a frozen QuantLinear: y = base(x) + B(A(dropout(x))) * scaling.
        Merging into the base is not supported (the base holds integer codes)."""

        def __init__(self, base_layer, adapter_name: str, config=None, r: int = 0, lora_alpha: int = 1,
                     **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            if config is not None and (config.use_dora or getattr(config, "velora_config", None) is not None):
                raise ValueError("hfquant: LoRA on QuantLinear does not support DoRA or VeLoRA; set use_dora=False")
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def resolve_lora_variant(self, *, config, **kwargs):
            return None

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A.keys():
                    continue
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                xa = self._cast_input_dtype(x, lora_A.weight.dtype)
                out = lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]
                result = result + out.to(result.dtype)
            return result

        def merge(self, *args, **kwargs) -> None:
            raise NotImplementedError("hfquant: LoRA adapters on QuantLinear cannot be merged into the quantized "
                                      "weight; keep them unmerged, or dequantize the model first")

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    _layer_cls = QuantLoraLinear
    return QuantLoraLinear


def register_lora(config):
    """Adds hfquant's LoRA layer for QuantLinear to a peft LoraConfig (in place) and returns it.

    Call it on every LoraConfig that targets an hfquant model: a new one for ``get_peft_model`` or
    ``model.add_adapter``, and the saved one when loading, e.g.
    ``PeftModel.from_pretrained(model, path, config=register_lora(LoraConfig.from_pretrained(path)))``.
    """
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("hfquant: register_lora needs peft (pip install peft)") from None
    if not isinstance(config, LoraConfig):
        raise ValueError(f"hfquant: register_lora takes a peft LoraConfig, got {type(config).__name__}")
    if not hasattr(config, "_register_custom_module"):
        import peft

        raise ValueError(f"hfquant: register_lora needs LoraConfig._register_custom_module, which peft "
                         f"{peft.__version__} lacks; upgrade peft")
    config._register_custom_module({QuantLinear: _make_layer_class()})
    return config
