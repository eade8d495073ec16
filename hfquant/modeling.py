"""Walking and editing a model: the helpers that the quantizer, the methods and the
calibration algorithms share (module names, tied weights, attention geometry, norms)."""
from __future__ import annotations

import copy
import difflib
import logging

import torch
from torch import Tensor, nn

logger = logging.getLogger("hfquant")


def name_matches(name: str, key: str) -> bool:
    """Whether ``key`` names the module ``name``: the whole name, or its end after a dot."""
    return name == key or name.endswith("." + key)


def is_listed(name: str, keys) -> bool:
    """Whether a list of module names (exact, or a suffix after a dot) names this module."""
    return any(name_matches(name, key) for key in keys)


def is_conv1d(module: nn.Module) -> bool:
    # GPT-2 style Conv1D: a linear layer whose weight is stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def did_you_mean(key: str, names: list[str]) -> str:
    """' (did you mean: a, b?)' over the names and their dotted suffixes (not those starting at a
    layer index), or ''."""
    parts = [n.split(".") for n in names if n]
    candidates = sorted({".".join(p[i:]) for p in parts for i in range(len(p)) if i == 0 or not p[i].isdigit()})
    close = difflib.get_close_matches(key, candidates, n=3)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def text_config(model):
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else None


def tied_sources(model: nn.Module) -> dict[str, str]:
    """{module tied to another's weight: the parameter it shares}, e.g. lm_head -> embed_tokens.weight."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k.removesuffix(".weight"): str(v) for k, v in dict(tied).items() if k.endswith(".weight")}


def untie(model: nn.Module, name: str) -> None:
    """Stops `name` from sharing its weight, here and in the saved config, so that it can hold
    its own quantized codes while the parameter it shared (an embedding) stays full precision."""
    model.all_tied_weights_keys.pop(name + ".weight", None)
    for cfg in {id(c): c for c in (getattr(model, "config", None), text_config(model)) if c is not None}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    logger.info("hfquant: %s was tied to another weight; it is untied and quantized", name)


def attention_geometry(model: nn.Module, attn: nn.Module) -> tuple[int, int, int] | None:
    """(num_heads, num_kv_heads, head_dim) from the attention's (or model's) config, or None."""
    cfg = getattr(attn, "config", None)
    if cfg is None:
        cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n_heads = getattr(cfg, "num_attention_heads", None)
    if not n_heads:
        return None
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // n_heads
    if not head_dim or n_heads % n_kv:
        return None
    return n_heads, n_kv, head_dim


def folds_into_norm(norm: nn.Module | None) -> bool:
    """Whether scaling the norm's weight (and bias) by r scales its output by r, checked on a probe.

    True for LayerNorm and Llama-style RMSNorm; False, e.g., for a norm that multiplies by
    (1 + weight), where dividing the weight by s is not dividing the output by s.
    """
    w = getattr(norm, "weight", None)
    if not isinstance(w, Tensor) or w.ndim != 1 or w.is_meta:
        return False
    bias = getattr(norm, "bias", None)
    gen = torch.Generator().manual_seed(0)
    r = (torch.rand(w.shape[0], generator=gen) + 0.5).to(w.device, w.dtype)
    x = torch.randn(4, w.shape[0], generator=gen).to(w.device, w.dtype)
    probe = copy.deepcopy(norm)
    with torch.no_grad():
        y = norm(x).float() * r.float()
        probe.weight.mul_(r)
        if isinstance(bias, Tensor):
            probe.bias.mul_(r)
        y_probe = probe(x).float()
    tol = 1e-4 if w.dtype == torch.float32 else 3e-2
    return bool((y_probe - y).abs().max() <= tol * y.abs().max().clamp_min(1e-6))
