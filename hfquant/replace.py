"""Finding the layers to quantize and swapping them for QuantLinear / Int8Linear."""
from __future__ import annotations

import difflib
import logging

import torch
from torch import nn

from .config import ACTIVATION_METHODS, DEFAULT_SKIP, HfQuantConfig, _name_matches
from .nn import Int8Linear, LutLinear, QuantEmbedding, QuantLinear, TiedQuantLinear
from .nn.embedding import check_embedding

logger = logging.getLogger("hfquant")


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2 style Conv1D: a linear layer whose weight is stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def tied_sources(model: nn.Module) -> dict[str, str]:
    """{module tied to another's weight: the parameter it shares}, e.g. lm_head -> embed_tokens.weight."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k.removesuffix(".weight"): str(v) for k, v in dict(tied).items() if k.endswith(".weight")}


def untie(model: nn.Module, name: str) -> None:
    """Stops `name` from sharing its weight, here and in the saved config, so that it can hold
    its own quantized codes while the parameter it shared (an embedding) stays full precision."""
    model.all_tied_weights_keys.pop(name + ".weight", None)
    for cfg in {id(c): c for c in (getattr(model, "config", None), _text_config(model)) if c is not None}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    logger.info("hfquant: %s was tied to another weight; it is untied and quantized", name)


def _text_config(model):
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else None


def find_targets(model: nn.Module, config: HfQuantConfig) -> tuple[list[tuple[str, nn.Module, bool]], list[str]]:
    """(name, module, transposed) of every layer to quantize, and the linear layers kept in full precision."""
    targets, kept = [], []
    for name, module in model.named_modules():
        conv1d = _is_conv1d(module)
        if not (isinstance(module, nn.Linear) or conv1d):
            continue
        if config.is_skipped(name):
            kept.append(name)
        else:
            targets.append((name, module, conv1d))
    return targets, kept


def embedding_targets(model: nn.Module, config: HfQuantConfig) -> list[tuple[str, nn.Embedding]]:
    """The nn.Embedding layers to quantize (config.quantize_embeddings, not skipped)."""
    if not config.quantize_embeddings:
        return []
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and not config.is_skipped(name):
            try:
                check_embedding(module)
            except ValueError as e:
                logger.warning("hfquant: %s stays in full precision: %s", name, e)
                continue
            out.append((name, module))
    return out


def tied_heads(model: nn.Module, config: HfQuantConfig, embeds, pre_quantized: bool) -> dict[str, str]:
    """{linear layer: embedding} of the output projections that share a quantized embedding:
    from the checkpoint's config when reloading, else the model's tied weights."""
    if pre_quantized:
        heads = dict(config.tied_modules)
        names = {n for n, _ in model.named_modules()}
        bad = [f"{h} -> {e}" for h, e in heads.items() if h not in names or e not in names]
        if bad:
            raise ValueError(f"hfquant: tied_modules names modules the model does not have: {', '.join(bad)}")
        return heads
    names = {n for n, _ in embeds}
    return {h: src.removesuffix(".weight") for h, src in tied_sources(model).items()
            if src.removesuffix(".weight") in names}


def _tie_heads(model: nn.Module, heads: dict[str, str]) -> None:
    for head, emb in heads.items():
        source = model.get_submodule(emb)
        if not isinstance(source, QuantEmbedding):
            raise ValueError(f"hfquant: {head} is tied to {emb}, which is not a quantized embedding")
        untie(model, head)
        _set_module(model, head, TiedQuantLinear(source, emb))
        logger.info("hfquant: %s shares the quantized table of %s", head, emb)


def check_overrides(model: nn.Module, config: HfQuantConfig) -> None:
    """Raises unless every name of modules_override names a module, and every name of
    modules_to_not_convert (but the default, lm_head, which a model may lack) a linear layer or
    an embedding, by the rule of ``is_listed`` (the whole name, or its end after a dot)."""
    names = [n for n, _ in model.named_modules()]
    for key in config.modules_override:
        if not any(_name_matches(n, key) for n in names):
            raise ValueError(f"hfquant: modules_override names {key!r}, but the model has no module of that name"
                             + _did_you_mean(key, names))
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) or _is_conv1d(m)]
    for key in config.modules_to_not_convert:
        if key in DEFAULT_SKIP or any(_name_matches(n, key) for n in layers):
            continue
        parents = [n for n in names if _name_matches(n, key)]
        inside = [(p, n) for p in parents for n in layers if n.startswith(p + ".")]
        if inside:
            p, n = inside[0]
            raise ValueError(f'hfquant: modules_to_not_convert names "{key}", which is not a linear layer or an '
                             f"embedding: list the layers inside it to keep them in full precision (e.g. "
                             f"{key + n[len(p):]})")
        if parents:
            continue  # a module without layers (a norm): it stays in full precision anyway
        raise ValueError(f'hfquant: modules_to_not_convert names "{key}", which matches no module of the model'
                         + _did_you_mean(key, layers))


def _did_you_mean(key: str, names: list[str]) -> str:
    """' (did you mean: a, b?)' over the names and their dotted suffixes (not those starting at a
    layer index), or ''."""
    parts = [n.split(".") for n in names if n]
    candidates = sorted({".".join(p[i:]) for p in parts for i in range(len(p)) if i == 0 or not p[i].isdigit()})
    close = difflib.get_close_matches(key, candidates, n=3)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_with_empty(model: nn.Module, config: HfQuantConfig, expect_float_weights: bool) -> list[str]:
    """Swaps target layers for empty QuantLinear modules (on the module's device, usually meta)."""
    check_overrides(model, config)
    targets, kept = find_targets(model, config)
    embeds = embedding_targets(model, config)
    heads = tied_heads(model, config, embeds, pre_quantized=not expect_float_weights)
    targets = [t for t in targets if t[0] not in heads]
    kept = [k for k in kept if k not in heads]
    tied = tied_sources(model)
    for name, module, transposed in targets:
        w = module.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
        # A tied layer has no weight of its own in a float checkpoint: it is quantized from
        # the parameter it shares once that has loaded (HfQuantQuantizer, after loading).
        from_tied = name in tied and expect_float_weights
        common = dict(dtype=w.dtype, device=w.device, float_weight_transposed=transposed,
                      float_weight_shape=tuple(w.shape) if expect_float_weights and not from_tied else None)
        if config.method in ACTIVATION_METHODS:
            new = Int8Linear(in_f, out_f, module.bias is not None, config.threshold,
                             smooth=config.is_listed(name, config.smooth_modules), **common)
        elif config.method == "kmeans":
            scheme = config.scheme_for(name)
            new = LutLinear(in_f, out_f, module.bias is not None, scheme["bits"], scheme["group_size"],
                            **_kmeans_settings(config), **common)
        else:
            scheme = config.scheme_for(name)
            new = QuantLinear(in_f, out_f, module.bias is not None, scheme["bits"], scheme["group_size"],
                              scheme["symmetric"], act_order=_act_order(config), **common)
        if from_tied:
            new.tied_source = tied[name]
        if name in tied:
            untie(model, name)
        _set_module(model, name, new)
    if not targets:
        raise ValueError("hfquant: the model has no nn.Linear (or Conv1D) layer to quantize")
    for name, module in embeds:
        scheme = config.scheme_for(name)
        w = module.weight
        _set_module(model, name, QuantEmbedding(
            module.num_embeddings, module.embedding_dim, scheme["bits"], scheme["group_size"], scheme["symmetric"],
            dtype=w.dtype, device=w.device, padding_idx=module.padding_idx,
            float_weight_shape=tuple(w.shape) if expect_float_weights else None))
    _tie_heads(model, heads)
    config.tied_modules = heads
    return kept


def _uses_gptq(config: HfQuantConfig) -> bool:
    return config.method == "gptq" or (config.method == "mixed" and config.mixed_base == "gptq")


def _act_order(config: HfQuantConfig) -> bool:
    """Whether the method's layers carry a column permutation (GPTQ act-order); layers
    that GPTQ did not reach (outside the decoder blocks) get the identity."""
    return _uses_gptq(config) and config.act_order


@torch.no_grad()
def quantize_in_place(model: nn.Module, config: HfQuantConfig, tokenizer=None) -> list[str]:
    """Quantizes the layers of a model in memory, one layer at a time: RTN, or GPTQ / AWQ
    calibrated on ``config.calibration`` first.

    Activation methods that need the float model first (SmoothQuant, the norm-scale fold)
    prepare it here; their run-time factors are listed in ``config.smooth_modules`` and
    stored in the layers. ``tokenizer`` serves SmoothQuant's calibration."""
    check_overrides(model, config)
    targets, kept = find_targets(model, config)
    embeds = embedding_targets(model, config)
    heads = tied_heads(model, config, embeds, pre_quantized=False)
    targets = [t for t in targets if t[0] not in heads]
    kept = [k for k in kept if k not in heads]
    if not targets:
        raise ValueError("hfquant: the model has no nn.Linear (or Conv1D) layer to quantize")
    smooth: dict[str, torch.Tensor] = {}
    gptq = {}
    if config.method == "mixed":
        from .algorithms.mixed import allocate_bits

        allocate_bits(model, config, targets, embeds, heads, tokenizer)
    if _uses_gptq(config):
        from .algorithms.gptq import gptq_model

        gptq = gptq_model(model, config, targets, tokenizer)
    elif config.method == "awq":
        from .algorithms.awq import awq_model

        awq_model(model, config, targets, tokenizer)
    elif config.method in ACTIVATION_METHODS and config.needs_float_model:
        from .algorithms.smoothquant import prepare_float_model

        smooth = prepare_float_model(model, config, tokenizer)
        config.smooth_modules = sorted(smooth)
    tied = tied_sources(model)
    for name, module, transposed in targets:
        if name in tied:
            untie(model, name)
        if module.weight.device.type == "meta":
            raise ValueError(f"hfquant: {name} has no weights (meta device); load the model first")
        if config.method in ACTIVATION_METHODS:
            new = Int8Linear.from_float(module, config.threshold, smooth.get(name), transposed=transposed)
        elif name in gptq:
            new = QuantLinear.from_quantized(gptq[name].quantized, module.bias, gptq[name].perm,
                                             act_order=_act_order(config))
        elif config.method == "kmeans":
            scheme = config.scheme_for(name)
            new = LutLinear.from_float(module, scheme["bits"], scheme["group_size"], transposed=transposed,
                                       **_kmeans_settings(config))
        else:
            scheme = config.scheme_for(name)
            new = QuantLinear.from_float(module, scheme["bits"], scheme["group_size"], scheme["symmetric"],
                                         transposed=transposed, act_order=_act_order(config))
        new.pack()
        _set_module(model, name, new)
    for name, module in embeds:
        if module.weight.device.type == "meta":
            raise ValueError(f"hfquant: {name} has no weights (meta device); load the model first")
        scheme = config.scheme_for(name)
        new = QuantEmbedding.from_embedding(module, scheme["bits"], scheme["group_size"], scheme["symmetric"])
        new.pack()
        _set_module(model, name, new)
    _tie_heads(model, heads)
    config.tied_modules = heads
    return kept


def _kmeans_settings(config: HfQuantConfig) -> dict:
    return dict(kmeans_init=config.kmeans_init, kmeans_max_iter=config.kmeans_max_iter,
                kmeans_seed=config.kmeans_seed)
