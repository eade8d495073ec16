"""Finding the fused MoE experts of a model, and the large matrices a quantized model left in float."""
from __future__ import annotations

import logging

from torch import nn

from .nn import PackedLinear, QuantEmbedding, QuantExperts
from .nn.experts import expert_count, expert_shapes, is_fused_experts

logger = logging.getLogger("hfquant")

# a float matrix at least this large that a quantized model keeps is reported
LEFTOVER_MIN_ELEMENTS = 1 << 20


def find_experts(model: nn.Module, config) -> tuple[list[tuple[str, nn.Module, dict]], list[str]]:
    """(name, module, shapes) of every fused experts module to quantize (3-D gate_up_proj /
    down_proj leading with the config's expert count), and those the config keeps in full
    precision (modules_to_not_convert). A 3-D expert tensor of another layout, or experts the
    config's method cannot quantize as configured (Method.check_experts), raise a ValueError
    naming the module, before anything is changed."""
    count = expert_count(getattr(model, "config", None))
    targets, kept = [], []
    for name, module in model.named_modules():
        if isinstance(module, QuantExperts) or not is_fused_experts(module):
            continue
        shapes = expert_shapes(name, module, count)
        if config.is_skipped(name):
            kept.append(name)
        else:
            config.impl.check_experts(name)
            targets.append((name, module, shapes))
    return targets, kept


def _is_router(name: str, module: nn.Module) -> bool:
    return name.rsplit(".", 1)[-1] in ("gate", "router") or "Router" in type(module).__name__


def float_leftovers(model: nn.Module, config) -> list[str]:
    """The float weight matrices (2-D or 3-D, at least LEFTOVER_MIN_ELEMENTS elements) of a
    quantized model that no hfquant module holds and the config did not exclude: not listed in
    modules_to_not_convert, not an embedding, not a MoE router."""
    out = []
    for mname, module in model.named_modules():
        if isinstance(module, (PackedLinear, QuantExperts, QuantEmbedding, nn.Embedding)):
            continue
        if config.is_skipped(mname) or _is_router(mname, module):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if (p is not None and p.dim() in (2, 3) and p.is_floating_point() and p.numel() >= LEFTOVER_MIN_ELEMENTS
                    and p.device.type != "meta"):
                out.append(f"{mname}.{pname}" if mname else pname)
    return out


def warn_float_leftovers(model: nn.Module, config) -> list[str]:
    """Logs a warning naming float_leftovers(model, config), if any; returns them."""
    left = float_leftovers(model, config)
    if left:
        logger.warning("hfquant: %d weight matrices stay in full precision although the config does not exclude them "
                       "(no hfquant module quantizes them): %s%s", len(left), ", ".join(left[:8]),
                       ", ..." if len(left) > 8 else "")
    return left


def quantized_share(model: nn.Module) -> tuple[int, int]:
    """(quantized, quantizable) weight elements: every linear layer and fused expert tensor of
    the model, as hfquant holds them or as float, routers, embeddings and lm_head aside."""
    q = total = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head") or _is_router(name, module):
            continue
        if isinstance(module, QuantExperts):
            n = sum(e * a * b for e, a, b in
                    ((module.num_experts, *module.proj_shape(p)) for p in ("gate_up", "down")))
            q, total = q + n, total + n
        elif isinstance(module, PackedLinear) and not isinstance(module, QuantEmbedding):
            n = module.in_features * module.out_features
            q, total = q + n, total + n
        elif isinstance(module, nn.Linear):
            total += module.weight.numel()
        elif is_fused_experts(module):
            fused = (module._parameters.get("gate_up_proj"), module._parameters.get("down_proj"))
            total += sum(p.numel() for p in fused if p is not None)
    return q, total


__all__ = ["find_experts", "float_leftovers", "quantized_share", "warn_float_leftovers"]
