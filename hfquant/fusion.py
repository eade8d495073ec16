"""Fused inference forwards for the float modules of a hfquant model.

A decode step of a small model is mostly dispatch: a Llama-family RMSNorm module runs seven
ATen calls from Python per token, twice per layer. ``fuse_norms`` gives each norm module whose
class computes ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` (checked numerically on
the module itself, per class, in the model's dtype and in float32, before anything changes) a
forward running ``hfquant::rms_norm``: one call, bit for bit the same result. Classes computing
anything else, even in another order (Gemma's ``1 + weight``, norms with a bias, LayerNorm),
fail the check and keep their forward.

The fused forward is an instance attribute: the class, the parameters and the state dict
are untouched. It runs the module's own forward where that is needed: when gradients flow
(training, QAT), under torch.compile (inductor fuses the formula itself), on devices without
a native kernel, and with ``hfquant.settings(fused_ops=False)``. Modules already wrapped by
accelerate's hooks (disk/CPU offload) are left alone.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from . import ops
from .runtime import settings

_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _norm_parts(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a module shaped like an RMSNorm: a 1-D float weight, an eps, no bias."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or not type(module).__name__.endswith("Norm"):
        return None
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.dtype not in _FLOATS or w.device.type == "meta":
        return None
    if getattr(module, "bias", None) is not None:
        return None
    eps = next((getattr(module, a) for a in _EPS_ATTRS if isinstance(getattr(module, a, None), float)), None)
    return None if eps is None else (w, eps)


def _computes_rms_norm(module: nn.Module, weight: torch.Tensor, eps: float) -> bool:
    """Whether the module's own forward gives hfquant::rms_norm's result, bit for bit, on seeded
    inputs in the weight's dtype and in float32."""
    gen = torch.Generator().manual_seed(0)
    d = weight.shape[0]
    try:
        with torch.no_grad():
            for dtype in dict.fromkeys((weight.dtype, torch.float32)):
                x = (torch.randn(3, d, generator=gen) * torch.tensor([[0.01], [1.0], [300.0]])).to(dtype)
                x = x.to(weight.device)
                want = type(module).forward(module, x)
                got = ops.rms_norm(x, weight, eps)
                if not isinstance(want, torch.Tensor) or want.shape != got.shape or want.dtype != got.dtype:
                    return False
                if not torch.equal(got, want):  # the op is the formula bit for bit: anything else differs
                    return False
    except Exception:  # a forward that does not take one tensor is not a plain norm
        return False
    return True


def _fused_rms_forward(self, hidden_states, *args, **kwargs):
    if (args or kwargs or not settings.fused_ops or hidden_states.device.type != "cpu"
            or hidden_states.dtype not in _FLOATS or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad))):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return ops.rms_norm(hidden_states, self.weight, self._hfquant_eps)


def fuse_norms(model: nn.Module) -> int:
    """Gives the model's RMSNorm modules the fused forward (see the module docstring); returns
    how many it changed."""
    verdict: dict[type, bool] = {}
    fused = 0
    for module in model.modules():
        parts = _norm_parts(module)
        if parts is None or "forward" in vars(module) or hasattr(module, "_hf_hook"):
            continue
        cls = type(module)
        if cls not in verdict:
            verdict[cls] = parts[0].device.type == "cpu" and _computes_rms_norm(module, *parts)
        if verdict[cls]:
            module._hfquant_eps = parts[1]
            module.forward = types.MethodType(_fused_rms_forward, module)
            fused += 1
    return fused


def fused_norms(model: nn.Module) -> list[str]:
    """Names of the modules fuse_norms gave the fused forward."""
    return [name for name, m in model.named_modules()
            if getattr(vars(m).get("forward"), "__func__", None) is _fused_rms_forward]
