"""Walking and editing a model: the helpers that the quantizer, the methods and the
calibration algorithms share (module names, tied weights, attention geometry, norms)."""
from __future__ import annotations

import copy
import difflib
import functools
import logging
import re

import torch
from torch import Tensor, nn

logger = logging.getLogger("hfquant")


def name_matches(name: str, key: str) -> bool:
    """Whether ``key`` names the module ``name``: the whole name, its end after a dot, or, for a
    key ``re:<pattern>``, the pattern matched from the start of the name (``re.match``, as
    llm-compressor's ignore lists: anchored at the start, not the end)."""
    if name == key:
        return True
    if key.startswith("re:"):
        return key_pattern(key).match(name) is not None
    return name.endswith("." + key)


@functools.lru_cache(maxsize=512)
def key_pattern(key: str) -> re.Pattern:
    """The compiled pattern of a ``re:`` key; ValueError if it is no regular expression."""
    try:
        return re.compile(key[3:])
    except re.error as e:
        raise ValueError(f'hfquant: "{key}" is not a valid regular expression ({e})') from None


def match_depth(name: str, key: str) -> int | None:
    """How many dotted parts the longest of ``name`` and its parents that ``key`` names has
    (a parent names everything under it), or None."""
    if not key.startswith("re:") and key not in name:
        return None  # a name key matches only where it is part of the name
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if name_matches(".".join(parts[:i]), key):
            return i
    return None


def is_listed(name: str, keys) -> bool:
    """Whether a list of keys (see ``name_matches``) names this module or one of its parents."""
    return any(match_depth(name, key) is not None for key in keys)


def overrides_for(name: str, overrides: dict) -> list:
    """The values of ``overrides`` whose key names this module or a parent, the one naming the
    nearest module last (a layer's entry wins over its block's); ties keep the dict's order."""
    hits = [(d, i, v) for i, (k, v) in enumerate(overrides.items()) if (d := match_depth(name, k)) is not None]
    return [v for _, _, v in sorted(hits, key=lambda h: h[:2])]


def is_conv1d(module: nn.Module) -> bool:
    # GPT-2 style Conv1D: a linear layer whose weight is stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` at ``name``; an online input rotation of the module it replaces
    (install_input_rotation) moves to the new module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    rotation = input_rotation(old)
    if rotation is not None and new is not old:
        install_input_rotation(new, rotation)
    setattr(parent, child, new)


def input_rotation(module: nn.Module | None):
    """The online rotation a module applies to its input (install_input_rotation), or None."""
    return getattr(module, "_hfquant_input_rotation", None)


def _rotate_input(module: nn.Module, args: tuple) -> tuple:
    return (module._hfquant_input_rotation.forward(args[0]), *args[1:])


def install_input_rotation(module: nn.Module, rotation) -> None:
    """Makes ``module`` rotate its input online: a forward pre-hook computing
    ``rotation.forward(x)`` before the module runs (an algorithms.rotation.HadamardRotation; its
    weights hold the inverse, so the pair computes what the module computed). Not a tensor of
    the state dict: checkpoints record it in their quantization_config, and loading installs it
    again. A second call with a rotation of the same size changes nothing."""
    have = input_rotation(module)
    if have is not None:
        if have.n != rotation.n or have.seed != rotation.seed:
            raise ValueError(f"hfquant: {type(module).__name__} already rotates its input (Hadamard {have.n}, seed "
                             f"{have.seed}); a second rotation (Hadamard {rotation.n}, seed {rotation.seed}) would "
                             "not be undone by its weights")
        return
    module._hfquant_input_rotation = rotation
    module.register_forward_pre_hook(_rotate_input)


def did_you_mean(key: str, names: list[str]) -> str:
    """' (did you mean: a, b?)' over the names and their dotted suffixes (not those starting at a
    layer index), or ''. A ``re:`` pattern found inside a name, not at its start, gets ``re:.*<pattern>``."""
    if key.startswith("re:"):
        found = any(key_pattern(key).search(n) for n in names)
        return f" (patterns match from the start of the name: did you mean re:.*{key[3:]}?)" if found else ""
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


def own_tied_params(model: nn.Module, name: str) -> None:
    """Gives the untied module ``name`` its own copy of each parameter still tied to another
    (BERT's ``cls.predictions.decoder.bias`` shares ``cls.predictions.bias``): the config no
    longer ties them on reload, so the checkpoint must hold both."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not tied:
        return
    module = model.get_submodule(name)
    for key, p in list(module._parameters.items()):
        if p is not None and tied.pop(f"{name}.{key}", None) is not None:
            module._parameters[key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


def tied_output_heads(model: nn.Module) -> list[str]:
    """The linear layers whose weight is tied to an embedding's (lm_head, BERT's
    cls.predictions.decoder, T5's lm_head)."""
    heads = []
    for head, src in tied_sources(model).items():
        try:
            m, source = model.get_submodule(head), model.get_submodule(src.removesuffix(".weight"))
        except AttributeError:
            continue
        if (isinstance(m, nn.Linear) or is_conv1d(m)) and isinstance(source, nn.Embedding):
            heads.append(head)
    return heads


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
