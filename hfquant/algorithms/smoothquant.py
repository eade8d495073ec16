"""SmoothQuant (Xiao et al. 2023): moving activation outliers into the weights.

A linear layer computes ``x @ W.T``. For any positive vector ``s`` over its input channels,
``(x / s) @ (W * s).T`` is the same function; choosing ``s_j = max|x_j|^a / max|W[:, j]|^(1-a)``
flattens the per-channel range of the activations (outlier channels shrink) at the cost of
widening that of the weights, which makes both easier to quantize. The division by ``s`` is
free where it can be folded into the operation that produces ``x`` (a norm's weight, or the
output rows of an earlier linear layer); elsewhere it has to be applied at run time.

All the arithmetic is float: factors in float32, folds computed in float32 and cast back to
each parameter's dtype.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import Tensor, nn

from ..modeling import attention_geometry, folds_into_norm, is_conv1d, is_listed
from .calibration import config_batches, run_calibration

_matches = is_listed

logger = logging.getLogger("hfquant")

S_MIN, S_MAX = 1e-5, 1e5  # smoothing factors are clamped to this range


def _weight_nk(module: nn.Module) -> Tensor:
    """The weight of a linear layer as [out_features, in_features]."""
    return module.weight.t() if is_conv1d(module) else module.weight


def collect_input_absmax(model: nn.Module, batches, modules: list[str] | None = None) -> dict[str, Tensor]:
    """{module name: max |x| per input channel (float32 [in_features], on CPU)} over every token of every batch.

    Hooks the input of every nn.Linear (and GPT-2 style Conv1D) of ``model``, or of the
    modules named in ``modules``, and runs the model over ``batches`` (see run_calibration).
    The hooks are removed afterwards, also when the forward pass fails. A module that the
    forward pass never reached is left out of the result (with a warning).
    """
    named = dict(model.named_modules())
    if modules is None:
        names = [n for n, m in named.items() if isinstance(m, nn.Linear) or is_conv1d(m)]
    else:
        unknown = [n for n in modules if n not in named]
        if unknown:
            raise ValueError(f"collect_input_absmax: the model has no module named {', '.join(map(repr, unknown))}")
        names = list(modules)

    maxes: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            # |x| is exact in any float dtype, so reduce in the input dtype and widen the [K] result.
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            prev = maxes.get(name)
            maxes[name] = m if prev is None else torch.maximum(prev, m)
        return hook

    handles = []
    try:
        for n in names:
            handles.append(named[n].register_forward_pre_hook(make_hook(n), with_kwargs=True))
        run_calibration(model, batches, desc="smoothquant: activation ranges")
    finally:
        for h in handles:
            h.remove()
    missed = [n for n in names if n not in maxes]
    if missed:
        logger.warning("hfquant: %d module(s) saw no input during calibration and are left out: %s",
                       len(missed), ", ".join(missed[:5]) + (", ..." if len(missed) > 5 else ""))
    return {n: maxes[n].cpu() for n in names if n in maxes}


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha must be in [0, 1], got {alpha!r}")


def smoothing_factors(act_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """s_j = max|X_j|^alpha / max_{i,n} |W_i[n, j]|^(1 - alpha), float32 [K].

    ``act_absmax`` is max |x| per input channel [K]; ``weights`` are the [N_i, K] weights of
    the layers that read that input. A channel whose activation or weight maximum is zero
    (or not finite) gets s = 1; the factors are clamped to [S_MIN, S_MAX].
    """
    _check_alpha(alpha)
    a = act_absmax.detach().float()
    k = a.shape[-1]
    for w in weights:
        if w.ndim != 2 or w.shape[1] != k:
            raise ValueError(f"smoothing_factors: a weight of shape {tuple(w.shape)} does not read {k} input channels")
    w_max = torch.stack([w.detach().abs().amax(0).float().to(a.device) for w in weights]).amax(0)
    s = a.pow(alpha) / w_max.pow(1.0 - alpha)
    s = torch.where((a > 0) & (w_max > 0), s, torch.ones_like(s))  # also NaN a -> 1
    return s.nan_to_num(nan=1.0).clamp(S_MIN, S_MAX)


def apply_smoothquant(model: nn.Module, act_absmax: dict[str, Tensor], alpha: float = 0.5,
                      skip: list[str] | tuple[str, ...] = ("lm_head",)) -> dict[str, Tensor]:
    """Smooths the linear layers named in ``act_absmax`` (from collect_input_absmax), in place.

    Where the division of a layer's input by s can be folded into the model, the float model
    afterwards computes the same function (up to rounding). In Llama-style decoder layers
    (``self_attn`` with q/k/v/o_proj, ``mlp`` with gate/up/down_proj, pre-norms
    ``input_layernorm`` and ``post_attention_layernorm`` whose output scales with their weight):

    * q/k/v_proj: one s from the shared input; input_layernorm weight (and bias) / s.
    * gate/up_proj: one s; post_attention_layernorm weight (and bias) / s.
    * down_proj: its input act(gate(x)) * up(x) is linear in up's output: up_proj rows / s.
    * o_proj: its input is attention-weighted v: v_proj rows / s. With grouped-query attention
      one v channel feeds the same channel of every query head of its group, so those o_proj
      channels share one s (from the max of their activation and weight ranges).

    In each case the weight columns of the smoothed layer are multiplied by s. Folding may
    rescale the output rows of v_proj and up_proj even when these are absent from
    ``act_absmax``, unless they are in ``skip``. All factors are computed from the original
    weights before any parameter changes.

    Every other module of ``act_absmax`` (other architectures, or a rule that does not apply)
    gets *run-time* smoothing: its weight columns are multiplied by s in place here, and its
    factor is returned. **The caller must then divide that module's input by s at run time**
    (e.g. inside the quantized op), or the model computes a different function.

    Modules matching ``skip`` (full names or name suffixes; default the output head, whose
    weight is often tied to the embedding) are not touched at all and get no factor.

    Returns {module name: s (float32 [in_features])} of the run-time smoothed modules; empty
    when everything was folded.
    """
    _check_alpha(alpha)
    skip = list(skip)
    named = dict(model.named_modules())
    unknown = [n for n in act_absmax if n not in named]
    if unknown:
        raise ValueError(f"apply_smoothquant: the model has no module named {', '.join(map(repr, unknown))}")
    active = {n: a for n, a in act_absmax.items() if not _matches(n, skip)}
    name_of = {id(m): n for n, m in named.items()}

    def in_active(*mods) -> bool:  # linear layers to smooth, not yet folded
        return all(isinstance(m, nn.Linear) and name_of.get(id(m)) in active and name_of[id(m)] not in folded
                   for m in mods)

    def touchable(*mods) -> bool:  # a linear layer whose output rows may be rescaled
        return all(isinstance(m, nn.Linear) and not _matches(name_of.get(id(m), ""), skip) for m in mods)

    # Plan: (tensor, s, dim, divide) rescalings, all from the original weights; applied at the end.
    ops: list[tuple[Tensor, Tensor, int, bool]] = []
    folded: set[str] = set()

    def rescale(module: nn.Module, s: Tensor, dim: int, divide: bool, with_bias: bool) -> None:
        ops.append((module.weight, s, dim, divide))
        if with_bias and isinstance(getattr(module, "bias", None), Tensor):
            ops.append((module.bias, s, 0, divide))

    for layer in named.values():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        norm1 = getattr(layer, "input_layernorm", None)
        norm2 = getattr(layer, "post_attention_layernorm", None)
        if attn is None and mlp is None:
            continue
        # Sequential pre-norm layout only: with extra feed-forward norms (Gemma-2, OLMo-2),
        # post_attention_layernorm normalises the attention output, not the MLP input.
        pre_norms = (norm1 is not None and norm2 is not None and not hasattr(layer, "pre_feedforward_layernorm")
                     and not hasattr(layer, "post_feedforward_layernorm"))
        q, k, v, o = (getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        gate, up, down = (getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj"))

        # 1. q/k/v <- input_layernorm
        if pre_norms and in_active(q, k, v) and folds_into_norm(norm1):
            s = smoothing_factors(active[name_of[id(q)]], [q.weight, k.weight, v.weight], alpha)
            rescale(norm1, s, 0, True, with_bias=True)
            for m in (q, k, v):
                rescale(m, s, 1, False, with_bias=False)
            folded.update(name_of[id(m)] for m in (q, k, v))

        # 2. gate/up <- post_attention_layernorm
        if pre_norms and in_active(gate, up) and folds_into_norm(norm2):
            s = smoothing_factors(active[name_of[id(up)]], [gate.weight, up.weight], alpha)
            rescale(norm2, s, 0, True, with_bias=True)
            for m in (gate, up):
                rescale(m, s, 1, False, with_bias=False)
            folded.update(name_of[id(m)] for m in (gate, up))

        # 3. down <- up_proj output rows
        if in_active(down) and touchable(up) and up.out_features == down.in_features:
            s = smoothing_factors(active[name_of[id(down)]], [down.weight], alpha)
            rescale(up, s, 0, True, with_bias=True)
            rescale(down, s, 1, False, with_bias=False)
            folded.add(name_of[id(down)])

        # 4. o <- v_proj output rows, one factor per kv channel
        geometry = attention_geometry(model, attn) if attn is not None else None
        if in_active(o) and touchable(v) and geometry is not None:
            n_heads, n_kv, hd = geometry
            rep = n_heads // n_kv  # query head h reads kv head h // rep
            if v.out_features == n_kv * hd and o.in_features == n_heads * hd:
                a = active[name_of[id(o)]].view(n_kv, rep, hd).amax(1).reshape(-1)
                w = o.weight.detach()
                # [N, heads*hd] -> [N*rep, kv*hd]: the columns of one kv channel's group stacked as rows
                w = w.view(w.shape[0], n_kv, rep, hd).transpose(1, 2).reshape(-1, n_kv * hd)
                s_kv = smoothing_factors(a, [w], alpha)
                s_o = s_kv.view(n_kv, 1, hd).expand(n_kv, rep, hd).reshape(-1)
                rescale(v, s_kv, 0, True, with_bias=True)
                rescale(o, s_o, 1, False, with_bias=False)
                folded.add(name_of[id(o)])

    runtime: dict[str, Tensor] = {}
    for n, a in active.items():
        if n in folded:
            continue
        m = named[n]
        if not (isinstance(m, nn.Linear) or is_conv1d(m)):
            raise TypeError(f"apply_smoothquant: {n!r} is a {type(m).__name__}, not a linear layer")
        s = smoothing_factors(a, [_weight_nk(m)], alpha)
        ops.append((m.weight, s, 0 if is_conv1d(m) else 1, False))  # Conv1D stores [in, out]
        runtime[n] = s

    # A parameter shared with another module (a tied output head) cannot be rescaled for one of them.
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    p_names = {id(p): n for n, p in model.named_parameters()}
    tied = sorted({p_names.get(id(t), "?") for t, *_ in ops if counts[id(t)] > 1})
    if tied:
        raise ValueError(f"apply_smoothquant: {', '.join(tied)} is shared with another module (tied weights); "
                         "add its module to `skip`")

    with torch.no_grad():
        for t, s, dim, divide in ops:
            shape = [1] * t.ndim
            shape[dim] = -1
            f = s.to(t.device).view(shape)
            t32 = t.float()
            t.copy_((t32 / f if divide else t32 * f).to(t.dtype))
    logger.info("hfquant: smoothquant (alpha %.2f): %d layers folded, %d smoothed at run time",
                alpha, len(folded), len(runtime))
    return runtime


def fold_norm_scales(model: nn.Module, skip: list[str] | tuple[str, ...] = ("lm_head",)) -> dict[str, Tensor]:
    """Moves the scale weights of the pre-norms into the linear layers they feed, without
    calibration: for q/k/v (input_layernorm) and gate/up (post_attention_layernorm),
    s = |norm weight| (floored at 1e-3 of its largest entry) goes through the SmoothQuant
    folding of apply_smoothquant, so the norm outputs x / s (the normalised residual
    stream) and the weights hold W * s. The float model computes the same function; the
    int8 activation quantizers then no longer see channels amplified by the norm's scale.
    Returns the run-time factors of apply_smoothquant (empty where every norm folds)."""
    absmax: dict[str, Tensor] = {}
    for name, layer in model.named_modules():
        for norm_name, parent_name, targets in (("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),
                                                 ("post_attention_layernorm", "mlp", ("gate_proj", "up_proj"))):
            norm, parent = getattr(layer, norm_name, None), getattr(layer, parent_name, None)
            w = getattr(norm, "weight", None)
            mods = [getattr(parent, t, None) for t in targets]
            if not isinstance(w, Tensor) or not all(isinstance(m, nn.Linear) for m in mods):
                continue
            if not folds_into_norm(norm):
                continue
            g = w.detach().float().abs()
            g = g.clamp_min(1e-3 * float(g.max()) if float(g.max()) > 0 else 1.0)
            for t in targets:
                absmax[f"{name}.{parent_name}.{t}" if name else f"{parent_name}.{t}"] = g
    absmax = {n: a for n, a in absmax.items() if not _matches(n, list(skip))}
    if not absmax:
        return {}
    return apply_smoothquant(model, absmax, alpha=1.0, skip=skip)


def prepare_float_model(model: nn.Module, config, tokenizer=None) -> dict[str, Tensor]:
    """What an activation method does to the float model before its layers are quantized:
    SmoothQuant when ``smoothquant_alpha`` is set, else the norm-scale fold when
    ``fold_norms`` is on. Returns the run-time factors (for ``<module>.smooth``)."""
    if config.smoothquant_alpha is not None:
        return smooth_model(model, config, tokenizer)
    if config.fold_norms:
        return fold_norm_scales(model, skip=list(config.modules_to_not_convert))
    return {}


def smooth_model(model: nn.Module, config, tokenizer=None) -> dict[str, Tensor]:
    """SmoothQuant as HfQuantConfig asks for it: calibrates on ``config.calibration`` (text,
    n_samples, seq_len), folds the factors into the model and returns the run-time ones
    (for ``<module>.smooth``). The tokenizer defaults to the one saved beside the model."""
    batches = config_batches(model, config, tokenizer, "SmoothQuant calibration")
    skip = list(config.modules_to_not_convert)
    absmax = collect_input_absmax(model, batches)
    absmax = {n: a for n, a in absmax.items() if not _matches(n, skip)}
    return apply_smoothquant(model, absmax, config.smoothquant_alpha, skip=skip)
