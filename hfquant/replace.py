"""Finding the layers to quantize and swapping them for QuantLinear / Int8Linear."""
from __future__ import annotations

import logging

import torch
from torch import nn

from .config import DEFAULT_SKIP, EMBEDDINGS_AUTO_BITS, HfQuantConfig
from .experts import find_experts
from .modeling import (did_you_mean, is_conv1d, is_listed, key_pattern, name_matches, overrides_for, own_tied_params,
                       set_module, tied_output_heads, tied_sources, untie)
from .nn import QuantEmbedding, TiedQuantLinear
from .nn.embedding import check_embedding

logger = logging.getLogger("hfquant")


def find_targets(model: nn.Module, config: HfQuantConfig) -> tuple[list[tuple[str, nn.Module, bool]], list[str]]:
    """(name, module, transposed) of every layer to quantize, and the linear layers kept in full precision."""
    targets, kept = [], []
    for name, module in model.named_modules():
        conv1d = is_conv1d(module)
        if not (isinstance(module, nn.Linear) or conv1d):
            continue
        if config.is_skipped(name):
            kept.append(name)
        else:
            targets.append((name, module, conv1d))
    return targets, kept


def embedding_targets(model: nn.Module, config: HfQuantConfig, refused: list[str] | None = None
                      ) -> list[tuple[str, nn.Embedding]]:
    """The nn.Embedding layers to quantize (config.quantize_embeddings, not skipped); those that
    must stay float are said in the log (and appended to ``refused``)."""
    if not config.quantize_embeddings:
        return []
    # a head with a bias cannot share a quantized table (TiedQuantLinear has none): its embedding stays float
    sources = tied_sources(model)
    biased = {sources[h].removesuffix(".weight"): h for h in tied_output_heads(model)
              if getattr(model.get_submodule(h), "bias", None) is not None}
    # embeddings tied to another embedding (T5's encoder and decoder share its table) stay float, all of them
    shared: dict[str, str] = {}
    for t, src in sources.items():
        if isinstance(model.get_submodule(t), nn.Embedding):
            shared[t] = src.removesuffix(".weight")
            shared.setdefault(src.removesuffix(".weight"), t)
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and not config.is_skipped(name):
            try:
                check_embedding(module)
                if name in biased:
                    raise ValueError(f"{biased[name]} shares its weight and has a bias, which a shared quantized "
                                     "table does not hold")
                if name in shared:
                    raise ValueError(f"it shares its table with the embedding {shared[name]}, which quantized "
                                     "embeddings do not")
            except ValueError as e:
                logger.warning("hfquant: %s stays in full precision: %s", name, e)
                if refused is not None:
                    refused.append(name)
                continue
            out.append((name, module))
    return out


def tied_heads(model: nn.Module, config: HfQuantConfig, embeds, pre_quantized: bool) -> dict[str, str]:
    """{linear layer: embedding} of the output projections that share a quantized embedding:
    from the checkpoint's config when reloading, else the model's tied weights."""
    if pre_quantized:
        names = {n for n, _ in model.named_modules()}
        heads = dict(config.tied_modules)
        prefix = getattr(model, "base_model_prefix", "") or ""
        if prefix and getattr(model, prefix, None) is None:
            # the base model alone (LlamaModel) from a full model's checkpoint: names without its prefix,
            # and no output head to tie
            heads = {h.removeprefix(prefix + "."): e.removeprefix(prefix + ".") for h, e in heads.items()}
            heads = {h: e for h, e in heads.items() if h in names or e not in names}
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
        set_module(model, head, TiedQuantLinear(source, emb))
        logger.info("hfquant: %s shares the quantized table of %s", head, emb)


# the last part of the name of a vision/audio encoder or multimodal projector kept in float by default
ENCODER_NAMES = ("vision_tower", "vision_model", "visual", "audio_tower", "multi_modal_projector", "mm_projector")


def default_skip(model: nn.Module) -> list[str]:
    """The modules kept in float by default besides lm_head: every sub-model built from the
    model config's ``vision_config`` / ``audio_config`` (a PreTrainedModel holding that config),
    every module whose name ends in one of ENCODER_NAMES (the outermost only), and the linear
    layers whose weight is tied to an embedding (BERT's cls.predictions.decoder)."""
    from transformers import PreTrainedModel

    cfg = getattr(model, "config", None)
    encoders = [c for c in (getattr(cfg, "vision_config", None), getattr(cfg, "audio_config", None)) if c is not None]
    found: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        sub = m.config if isinstance(m, PreTrainedModel) else None
        if name.rsplit(".", 1)[-1] in ENCODER_NAMES or (
                sub is not None and any(sub is c or type(sub) is type(c) for c in encoders)):
            found.append(name)
    return found + [h for h in tied_output_heads(model) if not is_listed(h, found)]


def add_default_skip(model: nn.Module, config: HfQuantConfig) -> None:
    """Where modules_to_not_convert was left out, adds default_skip's modules to it (once per
    model: the entries added for another model are replaced), so the saved config lists them."""
    auto = config.__dict__.get("_auto_skip")
    if auto is None:
        return
    user = [k for k in config.modules_to_not_convert if k not in auto]
    new = [n for n in default_skip(model) if not is_listed(n, user)]
    config.modules_to_not_convert = user + new
    config._auto_skip = new
    if new:
        logger.info("hfquant: kept in full precision by default: %s", ", ".join(new))


def _local_name(model: nn.Module, name: str) -> str:
    """A module's name without the base model's prefix: it names the module in the full model
    and in the base model alone (LlamaModel.from_pretrained of the saved checkpoint) by the rule
    of name_matches."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return name.removeprefix(prefix + ".") if prefix else name


def _drop_embedding_entries(config: HfQuantConfig) -> None:
    """Removes the entries settle_embeddings made for the previous model (before a new model's
    names are checked against the config)."""
    auto = config.__dict__.get("_auto_embed")
    for name in auto or ():
        entry = config.modules_override.get(name)
        if entry is not None:
            entry.pop("bits", None)
            if not entry:
                del config.modules_override[name]
    if auto is not None:
        config._auto_embed = []
    for name in config.__dict__.get("_float_embeds") or ():
        if name in config.modules_to_not_convert:
            config.modules_to_not_convert.remove(name)
    config._float_embeds = []
    for name in config.__dict__.get("_unskipped_heads") or ():  # the default skip entries given back
        if name not in config.modules_to_not_convert:
            config.modules_to_not_convert.insert(0, name)
    config._unskipped_heads = []


def settle_embeddings(model: nn.Module, config: HfQuantConfig, rotated_heads=()) -> None:
    """Before quantizing a model, after check_overrides (which drops the entries made for another
    model with the same config): the embeddings that must stay float are added to
    modules_to_not_convert, so the saved config keeps them float when the checkpoint reloads
    (the tie that kept them may be gone by then); and where quantize_embeddings was left out of
    a config of fewer than 8 bits (config._auto_embed a list), quantize_embeddings becomes True
    and each embedding to quantize gets a modules_override entry {"bits": EMBEDDINGS_AUTO_BITS}
    unless one there sets its bits; so do the output heads ``rotated_heads`` that shared its
    table until a rotation untied them."""
    auto = config.__dict__.get("_auto_embed")
    if auto is not None:
        config.quantize_embeddings = True
    refused: list[str] = []
    targets = embedding_targets(model, config, refused)
    config._float_embeds = [_local_name(model, n) for n in refused]
    config.modules_to_not_convert.extend(config._float_embeds)
    if auto is None:
        return
    new = [_local_name(model, n) for n, _ in targets
           if not any("bits" in o for o in overrides_for(n, config.modules_override))]
    # output heads that shared the embedding's table until a rotation untied them (rotation.py folds
    # the final norm into them) get its 8 bits as layers of their own, where only the default skip
    # of lm_head (modules_to_not_convert left out) would keep them float
    heads = [h for h in rotated_heads
             if config.__dict__.get("_auto_skip") is not None and h in DEFAULT_SKIP
             and h in config.modules_to_not_convert and isinstance(model.get_submodule(h), nn.Linear)
             and not any("bits" in o for o in overrides_for(h, config.modules_override))]
    for h in heads:
        config.modules_to_not_convert.remove(h)
    config._unskipped_heads = heads
    new += heads
    for name in new:  # beside a user's entry of the same name (group_size, symmetric), if any
        config.modules_override[name] = {**config.modules_override.get(name, {}), "bits": EMBEDDINGS_AUTO_BITS}
    config._auto_embed = new
    if new:
        logger.info("hfquant: quantized at %d bits by default: %s", EMBEDDINGS_AUTO_BITS, ", ".join(new))


def check_overrides(model: nn.Module, config: HfQuantConfig) -> None:
    """Adds the default entries (add_default_skip), then raises unless every key of
    modules_override and modules_to_not_convert (but lm_head, which a model may lack) names a
    module of the model by the rule of ``name_matches`` (the whole name, its end after a dot, or
    a ``re:`` pattern); a parent module stands for everything under it."""
    for what, keys in (("modules_override", list(config.modules_override)),
                       ("modules_to_not_convert", config.modules_to_not_convert)):
        for key in keys:
            if key.startswith("re:"):
                try:
                    key_pattern(key)
                except ValueError as e:
                    raise ValueError(f"hfquant: {what}: {str(e).removeprefix('hfquant: ')}") from None
    add_default_skip(model, config)
    _drop_embedding_entries(config)
    names = [n for n, _ in model.named_modules() if n]
    for key in config.modules_override:
        if not any(name_matches(n, key) for n in names):
            raise ValueError(f"hfquant: modules_override names {key!r}, but the model has no module of that name"
                             + did_you_mean(key, names))
    for key in config.modules_to_not_convert:
        if key not in DEFAULT_SKIP and not any(name_matches(n, key) for n in names):
            raise ValueError(f'hfquant: modules_to_not_convert names "{key}", which matches no module of the model'
                             + did_you_mean(key, names))


def _plan(model: nn.Module, config: HfQuantConfig, pre_quantized: bool, rotated_heads=()):
    """(linear layers to quantize, linear layers kept, embeddings to quantize, tied heads), the
    names checked first; the heads that share a quantized embedding are neither target nor kept."""
    check_overrides(model, config)
    if not pre_quantized:
        settle_embeddings(model, config, rotated_heads)
    embeds = embedding_targets(model, config)
    targets, kept = find_targets(model, config)
    heads = tied_heads(model, config, embeds, pre_quantized=pre_quantized)
    targets = [t for t in targets if t[0] not in heads]
    kept = [k for k in kept if k not in heads]
    if not targets:
        raise ValueError("hfquant: the model has no nn.Linear (or Conv1D) layer to quantize")
    return targets, kept, embeds, heads


def replace_with_empty(model: nn.Module, config: HfQuantConfig, expect_float_weights: bool) -> list[str]:
    """Swaps target layers for the method's empty layers (Method.empty_layer, on the module's
    device, usually meta), and embeddings for empty QuantEmbedding."""
    targets, kept, embeds, heads = _plan(model, config, pre_quantized=not expect_float_weights)
    experts, kept_experts = find_experts(model, config)  # refuses experts the method cannot quantize
    tied = tied_sources(model)
    for name, module, transposed in targets:
        w = module.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
        # A tied layer has no weight of its own in a float checkpoint: it is quantized from
        # the parameter it shares once that has loaded (HfQuantQuantizer, after loading).
        from_tied = name in tied and expect_float_weights
        common = dict(dtype=w.dtype, device=w.device, float_weight_transposed=transposed,
                      float_weight_shape=tuple(w.shape) if expect_float_weights and not from_tied else None)
        new = config.impl.empty_layer(name, in_f, out_f, module.bias is not None, **common)
        if from_tied:
            new.tied_source = tied[name]
        if name in tied:
            untie(model, name)
        set_module(model, name, new)
    for name, module in embeds:
        scheme = config.scheme_for(name)
        w = module.weight
        set_module(model, name, QuantEmbedding(
            module.num_embeddings, module.embedding_dim, scheme["bits"], scheme["group_size"], scheme["symmetric"],
            dtype=w.dtype, device=w.device, padding_idx=module.padding_idx,
            float_weight_shape=tuple(w.shape) if expect_float_weights else None))
    for name, module, shapes in experts:
        set_module(model, name, config.impl.empty_experts(name, module, shapes, float_weights=expect_float_weights))
    _tie_heads(model, heads)
    config.tied_modules = heads
    return kept + kept_experts


@torch.no_grad()
def quantize_in_place(model: nn.Module, config: HfQuantConfig, tokenizer=None) -> list[str]:
    """Quantizes the layers of a model in memory, one layer at a time, by the config's method
    (hfquant/methods/): its calibration step runs first on the float model where it has one
    (GPTQ, AWQ, mixed precision, SmoothQuant, the norm-scale fold). ``tokenizer`` serves the
    calibration (by default the one saved beside the model is loaded). A config with a
    ``rotation`` rotates the float model first (algorithms/rotation.py)."""
    targets, kept, embeds, heads = _plan(model, config, pre_quantized=False)
    method = config.impl
    experts, kept_experts = find_experts(model, config)
    if config.rotation is not None:
        from .algorithms.rotation import apply_rotation

        apply_rotation(model, config)  # may untie lm_head: the plan is made again
        targets, kept, embeds, heads = _plan(model, config, pre_quantized=False, rotated_heads=list(heads))
    if method.needs_float_model():
        method.calibrate(model, targets, embeds, heads, tokenizer)
    tied = tied_sources(model)
    for name, module, transposed in targets:
        if name in tied:
            untie(model, name)
        if module.weight.device.type == "meta":
            raise ValueError(f"hfquant: {name} has no weights (meta device); load the model first")
        new = method.quantize_layer(name, module, transposed)
        new.pack()
        set_module(model, name, new)
        if name in tied:
            own_tied_params(model, name)
    for name, module in embeds:
        if module.weight.device.type == "meta":
            raise ValueError(f"hfquant: {name} has no weights (meta device); load the model first")
        scheme = config.scheme_for(name)
        new = QuantEmbedding.from_embedding(module, scheme["bits"], scheme["group_size"], scheme["symmetric"])
        new.pack()
        set_module(model, name, new)
    for name, module, shapes in experts:
        if module.gate_up_proj.device.type == "meta":
            raise ValueError(f"hfquant: {name} has no weights (meta device); load the model first")
        new = method.quantize_experts_module(name, module, shapes["num_experts"])
        new.pack()
        set_module(model, name, new)
    _tie_heads(model, heads)
    config.tied_modules = heads
    return kept + kept_experts
