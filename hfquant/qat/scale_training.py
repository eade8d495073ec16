"""Scale-only fine-tuning of a quantized model (PEQA, Kim et al. 2023).

``enable_scale_training(model)`` turns the ``scales`` of every QuantLinear into trainable
parameters (and, for asymmetric layers, the zero points into float parameters rounded with
the straight-through estimator in the forward pass, so that they always stand for integer
codes); the integer codes stay frozen. The forward pass is still ``hfquant::qlinear``: the
kernel's scale layout is rebuilt from the parameters on every call with differentiable torch
ops, and the op's registered backward (hfquant/qat/autograd.py) carries the gradient to them.
Everything else in the model is frozen. ``save_pretrained`` writes format v1 as before (zero
points rounded to uint8, exactly the values the forward used).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..nn import PackedLinear, QuantLinear
from .autograd import packed_scales_from
from .fake_quant import round_ste


class ScaleTrainableQuantLinear(QuantLinear):
    """A QuantLinear whose scales (and zero points) are parameters. Made by
    enable_scale_training from a loaded QuantLinear (the class of that module is switched);
    the state dict keeps format v1 names, shapes and dtypes."""

    def _kernel_tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            zeros = None if self.zeros is None else self._zero_codes().to(torch.uint8)
            pw, ps = ops.repack(self.qweight, self.scales.detach(), zeros, self.bits, self.group_size,
                                self.in_features)
        return {"packed_weight": pw, "packed_scales": ps}

    def _zero_codes(self) -> torch.Tensor:
        qmax = (1 << self.bits) - 1
        return torch.clamp(round_ste(self.zeros), 0, qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._packed:
            self.pack()
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        zeros = None if self.zeros is None else self._zero_codes()
        ps = packed_scales_from(self.scales, zeros, self.bits, "cuda" if self.packed_weight.dim() == 2 else "cpu")
        return ops.qlinear(x, self.packed_weight, ps, self.bias, self.bits, self.group_size, self.out_features,
                           self.in_features)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        with torch.no_grad():
            zeros = None if self.zeros is None else self._zero_codes().to(torch.uint8)
            from .. import formats

            w = formats.dequantize(self._canonical_qweight(), self.scales.detach(), zeros, self.bits,
                                   self.group_size, self.in_features, dtype or self.scales.dtype)
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm.long())]
        return w

    @staticmethod
    def _format_v1_hook(module, state_dict, prefix, local_metadata):
        key = prefix + "scales"
        if key in state_dict:
            # the range grid has no negative scale; a trained one that crossed zero stands for 0
            # (signed grids keep their signs)
            state_dict[key] = state_dict[key].detach()
            if module.grid == "range":
                state_dict[key] = state_dict[key].clamp(min=0)
        key = prefix + "zeros"
        if key in state_dict and module.zeros is not None:
            qmax = (1 << module.bits) - 1
            state_dict[key] = torch.clamp(torch.round(state_dict[key].detach()), 0, qmax).to(torch.uint8)
        return state_dict

    def validate(self, name: str = "") -> None:
        raise RuntimeError("hfquant: a scale-trainable layer is validated when its checkpoint loads, not in training")


def enable_scale_training(model: nn.Module, zeros: bool = True) -> nn.Module:
    """Makes the scales (and, with ``zeros``, the zero points of asymmetric layers) of every
    QuantLinear trainable and freezes every other parameter; returns the model.

    Raises ValueError when the model holds no QuantLinear, or holds quantized layers whose
    format has no scales to train (Int8Linear's activation methods, LutLinear's codebooks)."""
    others = sorted({type(m).__name__ for m in model.modules()
                     if isinstance(m, PackedLinear) and not isinstance(m, QuantLinear)})
    if others:
        raise ValueError(f"enable_scale_training: the model holds {', '.join(others)} layers, which scale-only "
                         "training does not support (weight-only uniform layers, QuantLinear, only)")
    from ..nn import QuantEmbedding

    # a quantized embedding's table stays frozen (its lookup has no backward)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and not isinstance(m, QuantEmbedding)]
    low = sorted({m.bits for m in layers if m.bits not in (4, 8)})
    if low:
        raise ValueError(f"enable_scale_training: the model holds {'/'.join(map(str, low))}-bit layers; scale-only "
                         "training supports 4- and 8-bit QuantLinear layers")
    if not layers:
        raise ValueError("enable_scale_training: the model holds no QuantLinear layer; load or quantize it with "
                         "hfquant first (a float model trains with hfquant.prepare_qat)")
    offset = [m for m in layers if getattr(m, "offsets", None) is not None]
    if offset:
        raise ValueError("enable_scale_training: the model holds layers with float offsets (zero_point='float'); "
                         "scale-only training supports integer zero points")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers:
        if isinstance(m, ScaleTrainableQuantLinear):
            m.scales.requires_grad_(True)
            if m.zeros is not None:
                m.zeros.requires_grad_(zeros)
            continue
        if not m._packed:
            m.pack()
        m.__class__ = ScaleTrainableQuantLinear
        s = m._buffers.pop("scales")
        m.scales = nn.Parameter(s.detach().clone(), requires_grad=True)
        if m.zeros is not None:
            z = m._buffers.pop("zeros")
            m.zeros = nn.Parameter(z.detach().to(s.dtype if s.dtype != torch.bfloat16 else torch.float32),
                                   requires_grad=zeros)
        m._register_state_dict_hook(ScaleTrainableQuantLinear._format_v1_hook)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.scale_training = True
    return model


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable scales and zero points of a model after enable_scale_training."""
    return [p for m in model.modules() if isinstance(m, ScaleTrainableQuantLinear)
            for p in (m.scales, m.zeros) if p is not None and p.requires_grad]
