"""LoRA adapters on QuantLinear layers through peft (QLoRA-style fine-tuning on a quantized base).

peft picks a LoRA layer class for each target module from a fixed list of dispatchers and
rejects module types it does not know. hfquant adds one: when peft's LoRA model module is
imported (now, or later: a hook waits for the import, so ``import hfquant`` does not import
peft), ``LoraModel._create_new_module`` is wrapped to wrap QuantLinear targets in
QuantLoraLinear first and leave every other module to peft. The base layer stays frozen and
quantized; its op passes gradients to its input (hfquant/qat/autograd.py), so adapters in
every layer train. Adapters save and load with peft's own save_pretrained /
PeftModel.from_pretrained on top of the quantized checkpoint.

``LoraConfig._register_custom_module({QuantLinear: QuantLoraLinear})`` is peft's own route to
the same layer.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

import torch

from ..nn import QuantLinear

_TARGET = "peft.tuners.lora.model"
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


def _patch(module) -> None:
    lora_model = module.LoraModel
    original = lora_model.__dict__["_create_new_module"]
    if getattr(original, "_hfquant", False):
        return
    create = original.__func__ if isinstance(original, staticmethod) else original

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        from peft.tuners.tuners_utils import BaseTunerLayer

        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, QuantLinear):
            kwargs.pop("device_map", None)
            return _make_layer_class()(target, adapter_name, config=lora_config, **kwargs)
        return create(lora_config, adapter_name, target, **kwargs)

    _create_new_module._hfquant = True
    lora_model._create_new_module = staticmethod(_create_new_module)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches peft's LoRA model module right after it is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Teaches peft's LoRA to wrap QuantLinear (now if peft is imported, else on its import)."""
    if _TARGET in sys.modules:
        _patch(sys.modules[_TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def quant_lora_linear_class():
    """peft's route: ``LoraConfig._register_custom_module({QuantLinear: quant_lora_linear_class()})``."""
    return _make_layer_class()
