"""Training quantized models: quantization-aware training (fake quantization with the
straight-through estimator, optional learned step sizes), scale-only fine-tuning of a
quantized model (PEQA), LoRA on quantized layers through peft, and distillation from the
full-precision model (layer by layer, and data-free QAT on generated text)."""
from .autograd import register as _register_autograd
from .lora import install as _install_peft_dispatch
from .fake_quant import FakeQuantLinear, convert, prepare_qat
from .scale_training import ScaleTrainableQuantLinear, enable_scale_training, scale_parameters

_register_autograd()
_install_peft_dispatch()

__all__ = ["FakeQuantLinear", "ScaleTrainableQuantLinear", "convert", "enable_scale_training", "prepare_qat",
           "scale_parameters"]
