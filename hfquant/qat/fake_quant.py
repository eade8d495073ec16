"""Quantization-aware training: fake-quant linear layers and their conversion to QuantLinear.

``prepare_qat(model, config)`` swaps the layers ``config`` would quantize for
FakeQuantLinear: the float weight stays a trainable parameter, and every forward pass
multiplies by the weight that format v1 would store for it (quantize, then dequantize, with
the rounding and clamping of hfquant.formats.v1). The backward pass treats the rounding as
the identity (the straight-through estimator). With ``learn_scales=True`` the group scales
are parameters too, trained by the gradient that rounding with STE gives them (LSQ, Esser
et al. 2020). ``convert(model)`` turns each FakeQuantLinear into the QuantLinear holding
exactly the codes and scales its forward pass used, so the converted model computes what the
fake-quant model computed (up to the kernel's float32 accumulation order).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import HfQuantConfig
from ..formats import v1
from ..nn import PackedLinear, QuantLinear


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through)."""
    return x + (torch.round(x) - x).detach()


def _safe(s: torch.Tensor) -> torch.Tensor:
    # a zero scale (an all-zero group) gives code z, as quantize_codes does
    return torch.where(s != 0, s, torch.ones_like(s))


class FakeQuantLinear(nn.Module):
    """A Linear layer trained through simulated format v1 quantization of its weight.

    ``weight`` float [out, in] (trainable), ``bias`` [out] or None. Without learned scales,
    each group's scale and zero point come from the current weight as in round to nearest
    (hfquant.formats.v1.group_params); with ``learn_scales`` the scales are the parameter
    ``scale`` [out, G] (initialised by round to nearest) and the zero points the buffer
    ``zero`` [out, G] fixed at initialisation. ``grid`` places a symmetric grid as method rtn's
    setting does ("extreme" and "best" give signed scales; a learned one keeps its sign).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int,
                 symmetric: bool, learn_scales: bool = False, transposed: bool = False, grid: str = "range"):
        super().__init__()
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"FakeQuantLinear: weight must be a 2-D float tensor, got {tuple(weight.shape)} "
                             f"{weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.grid = grid if symmetric else "range"
        self.transposed = transposed
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.learn_scales = learn_scales
        if learn_scales:
            s, z = self._rtn_params()
            self.scale = nn.Parameter(s.to(weight.dtype))
            self.register_buffer("zero", z)
        else:
            self.scale = None
            self.zero = None

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int, group_size: int, symmetric: bool,
                    learn_scales: bool = False, transposed: bool = False, grid: str = "range") -> "FakeQuantLinear":
        w = linear.weight.detach()
        return cls(w.t() if transposed else w, None if linear.bias is None else linear.bias.detach(), bits,
                   group_size, symmetric, learn_scales, transposed, grid)

    @torch.no_grad()
    def _rtn_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = v1.grouped(self.weight.detach().to(torch.float32), self.group_size)
        return v1.group_params(w, self.bits, self.symmetric, self.weight.dtype, grid=self.grid)

    def quant_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) [out, G] float32 that the forward pass uses; the scale carries
        gradient when learned."""
        if self.learn_scales:
            if self.grid != "range":  # signed scales: each keeps the sign it started with
                return self.scale.to(torch.float32), self.zero
            # the stored scales are >= 0 on the range grid; a learned one that went negative is 0
            return torch.clamp(self.scale.to(torch.float32), min=0.0), self.zero
        return self._rtn_params()

    def codes(self) -> torch.Tensor:
        """The integral codes [out, in] (float32) the forward pass uses."""
        with torch.no_grad():
            s, z = self.quant_params()
            w = v1.grouped(self.weight.detach().to(torch.float32), self.group_size)
            return v1.quantize_codes(w, s, z, self.bits, self.symmetric).reshape(self.out_features, -1)[
                :, :self.in_features]

    def quantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with, float32 [out, in]: (code - z) * s, where code =
        clamp(round(w / s) + z) exactly as in format v1; gradients pass the rounding unchanged
        (STE) and the clamp as its derivative (zero outside the code range)."""
        s, z = self.quant_params()
        lo, hi = v1.code_range(self.bits, self.symmetric)
        w = v1.grouped(self.weight.to(torch.float32), self.group_size)  # [N, G, g]
        code = torch.clamp(round_ste(w / _safe(s)[..., None]) + z[..., None], lo, hi)
        dq = (code - z[..., None]) * s[..., None]
        return dq.reshape(self.out_features, -1)[:, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quantized(self) -> QuantLinear:
        """The QuantLinear (format v1) holding this layer's current codes and scales."""
        s, z = self.quant_params()
        codes = self.codes()
        q = v1.QuantizedWeight(v1.pack_codes(codes, self.bits, self.symmetric), s.to(self.weight.dtype).contiguous(),
                               None if self.symmetric else z.to(torch.uint8).contiguous(), self.bits,
                               self.group_size, self.in_features)
        mod = QuantLinear.from_quantized(q, None if self.bias is None else self.bias.detach(), grid=self.grid)
        mod.float_weight_transposed = self.transposed
        return mod

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, {g}, {'symmetric' if self.symmetric else 'asymmetric'}"
                f"{'' if self.grid == 'range' else ', grid=' + self.grid}"
                f"{', learned scales' if self.learn_scales else ''}")


def check_trainable_config(config: HfQuantConfig, what: str) -> None:
    """Raises unless QAT can simulate ``config``'s method (Method.qat: weight-only uniform codes, "rtn")."""
    if not isinstance(config, HfQuantConfig):
        raise TypeError(f"{what}: expected an HfQuantConfig, got {type(config).__name__}")
    if not config.impl.qat:
        raise ValueError(f"{what}: method={config.method!r} is not trainable by QAT ({config.impl.why_not_qat}); "
                         "use method='rtn' "
                         "with the bits / group_size / symmetric to train for")
    if config.impl.grid_args()["zero_point"] != "integer":
        raise ValueError(f"{what}: QAT simulates integer zero points; this config asks for zero_point="
                         f"{config.impl.grid_args()['zero_point']!r} (use zero_point='integer')")


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_quantized", False)) or any(isinstance(m, PackedLinear) for m in model.modules())


def prepare_qat(model: nn.Module, config: HfQuantConfig | None = None, learn_scales: bool = False,
                **kwargs) -> nn.Module:
    """Swaps the layers ``config`` would quantize for FakeQuantLinear (in place) and returns
    the model, ready to train with any optimizer or the transformers Trainer.

    Skipped and per-module settings follow the config (modules_to_not_convert,
    modules_override). A layer tied to another's weight (lm_head to the embedding) gets its
    own copy of the weight and is untied. ``learn_scales`` makes the group scales trainable
    parameters (LSQ). ``hfquant.convert`` then gives the quantized model.
    """
    from ..modeling import set_module, tied_sources, untie
    from ..replace import check_overrides, find_targets

    if config is None:
        config = HfQuantConfig(**kwargs)
    elif kwargs:
        raise ValueError("prepare_qat: pass either a config or keyword settings, not both")
    check_trainable_config(config, "prepare_qat")
    if is_quantized(model):
        raise ValueError("prepare_qat: the model is already quantized (it holds hfquant quantized layers); "
                         "QAT starts from the float model. To fine-tune a quantized model, use "
                         "hfquant.enable_scale_training (scales only) or LoRA through peft "
                         "(hfquant.register_lora)")
    if any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("prepare_qat: the model already holds FakeQuantLinear layers (prepare_qat ran on it)")
    check_overrides(model, config)
    targets, kept = find_targets(model, config)
    if not targets:
        raise ValueError("prepare_qat: the model has no nn.Linear (or Conv1D) layer to quantize")
    if config.rotation is not None:  # the float model is rotated first (algorithms/rotation.py)
        from ..algorithms.rotation import apply_rotation

        apply_rotation(model, config)
    tied = tied_sources(model)
    for name, module, transposed in targets:
        if module.weight.device.type == "meta":
            raise ValueError(f"prepare_qat: {name} has no weights (meta device); load the model first")
        if name in tied:
            untie(model, name)
        scheme = config.scheme_for(name)
        new = FakeQuantLinear.from_linear(module, scheme["bits"], scheme["group_size"], scheme["symmetric"],
                                          learn_scales=learn_scales, transposed=transposed,
                                          grid=config.impl.grid_args()["grid"])
        set_module(model, name, new)
    model._hfquant_qat = {"config": config, "kept": kept}
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replaces every FakeQuantLinear by the QuantLinear holding its codes and scales (in
    place) and returns the model, which saves with ``save_pretrained`` in format v1 and
    reloads with ``from_pretrained`` like a model quantized on load."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not names:
        raise ValueError("convert: the model holds no FakeQuantLinear layer; call hfquant.prepare_qat(model, config) "
                         "and train it first")
    from ..modeling import set_module

    state = getattr(model, "_hfquant_qat", None)
    config = state["config"] if state else _config_from_layers(model)
    kept = state["kept"] if state else []
    for name in names:
        new = model.get_submodule(name).to_quantized()
        new.pack()
        set_module(model, name, new)
    if state is not None:
        del model._hfquant_qat
    attach_quantized(model, config, kept)
    return model


def _config_from_layers(model: nn.Module) -> HfQuantConfig:
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    first = layers[0]
    config = HfQuantConfig(bits=first.bits, group_size=first.group_size, symmetric=first.symmetric,
                           modules_to_not_convert=[], grid=first.grid)
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear) and (m.bits, m.group_size, m.symmetric) != \
                (first.bits, first.group_size, first.symmetric):
            config.modules_override[name] = {"bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric}
    return config


def attach_quantized(model: nn.Module, config: HfQuantConfig, kept: list[str]) -> None:
    """Marks a transformers model as hfquant-quantized with ``config`` (what quantize_model
    does after quantizing), so that save_pretrained writes the quantization_config."""
    if not (hasattr(model, "config") and hasattr(model, "save_pretrained")):
        return
    from ..quantizer import attach_quantizer

    attach_quantizer(model, config, kept)
