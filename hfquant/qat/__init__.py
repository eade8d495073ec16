"""Training quantized models: quantization-aware training (fake quantization with the
straight-through estimator, optional learned step sizes), scale-only fine-tuning of a
quantized model (PEQA), LoRA on quantized layers through peft (register_lora), and
distillation from the full-precision model (layer by layer, and data-free QAT on generated
text)."""
from .autograd import register as _register_autograd
from .fake_quant import FakeQuantLinear, convert, prepare_qat
from .lora import register_lora
from .scale_training import ScaleTrainableQuantLinear, enable_scale_training, scale_parameters

_register_autograd()

__all__ = ["FakeQuantLinear", "ScaleTrainableQuantLinear", "convert", "enable_scale_training", "prepare_qat",
           "register_lora", "scale_parameters"]
