"""GPTQ (Frantar et al., 2023): quantization with second-order error compensation.

For a linear layer with weight W [N, K] and calibration inputs X [tokens, K], GPTQ
minimises ||X W^T - X Q^T||^2 column by column: each column of W is rounded, and its
rounding error, scaled by the inverse Hessian H^-1 (H = 2 X^T X / tokens), is spread over
the columns not yet rounded. The implementation follows the paper's lazy-batch form:
the inverse Hessian's upper Cholesky factor, updates inside blocks of 128 columns and one
matrix product per block for the rest of the row; dampening of H's diagonal by
``damp * mean(diag H)``; group-wise scales computed from the already-updated weights when
a group starts; and act-order: columns processed by decreasing diag(H), with the
permutation stored (``perm``) so that the stored columns, and thus the groups, are
contiguous in that order and the layer reads its input as x[..., perm].

The result is format v1 tensors (qweight, scales, zeros) plus the optional ``perm``.

Fused MoE experts (hfquant.nn.QuantExperts) are calibrated per expert: each expert's
gate_up matrix [2I, H] on the hidden states of the tokens routed to it, its down matrix
[H, I] on those tokens' intermediate activations act(gate) * up computed with the float
gate_up (as the dense path takes down_proj's Hessian from the float block). Experts run
without act-order (QuantExperts holds no column permutation); an expert that receives no
calibration token is rounded to nearest instead, and reported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..formats.v1 import QuantizedWeight, group_params, pack_codes, quantize_codes

logger = logging.getLogger("hfquant")


@dataclass
class GPTQResult:
    quantized: QuantizedWeight
    perm: Tensor | None  # int64 [K]: stored column j holds input column perm[j]
    error: float  # the layer's output error tr((W - Q) H (W - Q)^T) / tr(W H W^T)


class HessianAccumulator:
    """Running H = 2 X^T X / tokens (float64 sum, float32 result) of one layer input."""

    def __init__(self, k: int, device=None):
        self.sum = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError("hfquant: GPTQ calibration input holds NaN or Inf")
        self.sum += (x.t() @ x).to(torch.float64)
        self.tokens += x.shape[0]

    def hessian(self) -> Tensor:
        if self.tokens == 0:
            raise ValueError("hfquant: GPTQ saw no calibration tokens for a layer")
        return (2.0 * self.sum / self.tokens).to(torch.float32)


def search_clip(w: Tensor, h: Tensor | None, bits: int, symmetric: bool, scale_dtype, steps: int = 20,
                max_shrink: float = 0.8) -> Tensor:
    """The factor in 1, 1 - 1/steps, ..., 1 - max_shrink that, shrinking each group's range
    (group_params' ``clip``), minimises sum_k h_k (w_k - dequant(w_k))^2 per group of ``w``
    [..., g]; h [g] or None (all ones: the weight-space error). GPTQ passes the Hessian
    diagonal of the group's columns, the output error of each column alone (a plain
    weight-space error would clip the weights that meet the largest activations)."""
    h = torch.ones(w.shape[-1], dtype=torch.float32, device=w.device) if h is None else h
    best_c = torch.ones(w.shape[:-1], dtype=torch.float32, device=w.device)
    best_err = _err(w, h, *group_params(w, bits, symmetric, scale_dtype), bits, symmetric)
    for i in range(1, int(max_shrink * steps) + 1):
        c = 1.0 - i / steps
        err = _err(w, h, *group_params(w, bits, symmetric, scale_dtype, clip=c), bits, symmetric)
        better = err < best_err
        best_c = torch.where(better, torch.full_like(best_c, c), best_c)
        best_err = torch.where(better, err, best_err)
    return best_c


def _search_clip(w: Tensor, h: Tensor, bits: int, symmetric: bool, scale_dtype) -> tuple[Tensor, Tensor]:
    """The group parameters of GPTQ's clipping search (search_clip with the Hessian diagonal)."""
    return group_params(w, bits, symmetric, scale_dtype, clip=search_clip(w, h, bits, symmetric, scale_dtype))


def _err(w, h, s, z, bits, symmetric):
    dq = (quantize_codes(w, s, z, bits, symmetric) - z[..., None]) * s[..., None]
    return ((w - dq).pow(2) * h).sum(-1)


def _damped_inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; the dampening grows tenfold
    (up to 1.0 relative) while H is not positive definite in float32."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d = damp
    while True:
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                if d != damp:
                    logger.info("hfquant: GPTQ raised the dampening to %g for a layer", d)
                return U
        if d >= 1.0:
            raise ValueError("hfquant: GPTQ's Hessian is not positive definite even with dampening 1.0 "
                             "(too little or degenerate calibration data)")
        d = min(1.0, d * 10)


@torch.no_grad()
def gptq_quantize(weight: Tensor, H: Tensor, bits: int, group_size: int, symmetric: bool, damp: float = 0.01,
                  act_order: bool = True, clip_search: bool = True, block_size: int = 128,
                  scale_dtype: torch.dtype | None = None) -> GPTQResult:
    """GPTQ of one weight [N, K] with the Hessian H [K, K] of its inputs."""
    if weight.dim() != 2 or H.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq_quantize: weight {tuple(weight.shape)} and Hessian {tuple(H.shape)} do not match")
    if not torch.isfinite(weight).all():
        raise ValueError("gptq_quantize: weight contains NaN or Inf")
    scale_dtype = scale_dtype or weight.dtype
    W = weight.detach().to(torch.float32).clone()
    N, K = W.shape
    H = H.detach().to(torch.float32).clone()
    W0, H0 = W.clone(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = _damped_inverse_cholesky(H, damp)

    g = K if group_size == -1 else group_size
    G = -(-K // g)
    # blocks hold whole groups, so a group's parameters come from its updated weights
    block = block_size if group_size == -1 else max(block_size // g, 1) * g
    hdiag = torch.diag(H)
    params = (lambda w, h: _search_clip(w, h, bits, symmetric, scale_dtype)) if clip_search else \
        (lambda w, h: group_params(w, bits, symmetric, scale_dtype))
    S = torch.empty(N, G, dtype=torch.float32, device=W.device)
    Z = torch.empty(N, G, dtype=torch.float32, device=W.device)
    codes = torch.empty(N, K, dtype=torch.float32, device=W.device)
    if group_size == -1:
        S[:, 0], Z[:, 0] = params(W, hdiag)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = col // g
            if group_size != -1 and col % g == 0:
                S[:, gi], Z[:, gi] = params(W1[:, i:i + g], hdiag[col:col + g])
            s, z = S[:, gi], Z[:, gi]
            w = W1[:, i]
            q = quantize_codes(w[:, None], s, z, bits, symmetric)[:, 0]
            codes[:, col] = q
            err = (w - (q - z) * s) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            E1[:, i] = err
        W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)

    zeros = None if symmetric else Z.to(torch.uint8)
    q = QuantizedWeight(pack_codes(codes, bits, symmetric), S.to(scale_dtype).contiguous(), zeros, bits,
                        group_size, K)
    # reconstruction error in the original column order, relative to the layer's output energy
    gidx = torch.arange(K, device=W.device) // g
    deq = (codes - Z[:, gidx]) * S[:, gidx]
    if perm is not None:
        deq = deq[:, torch.argsort(perm)]
    D = W0 - deq
    error = float((D @ H0 * D).sum() / (W0 @ H0 * W0).sum().clamp_min(1e-30))
    return GPTQResult(q, perm, error)


def dequantized_weight(result: GPTQResult) -> Tensor:
    """The float weight [N, K] (original column order) a GPTQ result stands for."""
    from ..formats import dequantize

    q = result.quantized
    w = dequantize(q.qweight, q.scales, q.zeros, q.bits, q.group_size, q.in_features, torch.float32)
    return w if result.perm is None else w[:, torch.argsort(result.perm)]


@dataclass
class ExpertsResult:
    """GPTQ of one fused experts module: per projection ("gate_up", "down") one quantized
    matrix per expert ([out, in], no permutation), the relative output error of each (None
    where rounded to nearest), and the experts that received no calibration token."""
    quantized: dict[str, list[QuantizedWeight]]
    errors: dict[str, list[float | None]]
    empty: list[int]
    tokens: list[int]


def expert_weight(module: nn.Module, proj: str, e: int) -> Tensor:
    """Expert ``e``'s matrix [out, in] of a projection of a fused experts module (a view)."""
    w = getattr(module, f"{proj}_proj")[e]
    return w.t() if getattr(module, "is_transposed", False) else w


def expert_activation(module: nn.Module, gate_up: Tensor) -> Tensor:
    """The activation between an experts module's projections, act(gate) * up, as its class computes it."""
    fn = getattr(type(module), "_apply_gate", None)
    if fn is not None:
        return fn(module, gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def routed_call(module: nn.Module, args: tuple, kw: dict) -> tuple[Tensor, Tensor]:
    """(hidden states [T, H], expert ids [T, k]) of a call of a fused experts module."""
    hidden = args[0] if args else kw["hidden_states"]
    if len(args) > 1:
        idx = args[1]
    else:
        idx = kw["top_k_index"] if "top_k_index" in kw else kw["router_indices"]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return hidden, idx.reshape(hidden.shape[0], -1)


def routed_inputs(module: nn.Module, hidden: Tensor, idx: Tensor, e: int) -> tuple[Tensor, Tensor] | None:
    """(gate_up input, down input) of expert ``e`` for the tokens routed to it, with the
    module's float weights; None when no token is."""
    tok = (idx == e).any(-1).nonzero().flatten()
    if tok.numel() == 0:
        return None
    x = hidden[tok]
    b = module._parameters.get("gate_up_proj_bias")
    w = expert_weight(module, "gate_up", e)
    h = expert_activation(module, nn.functional.linear(x, w.to(x.dtype), None if b is None else b[e].to(x.dtype)))
    return x, h


def add_routed(module: nn.Module, hidden: Tensor, idx: Tensor, per: dict[str, list], tokens: list[int],
               make) -> None:
    """Adds each expert's routed inputs (routed_inputs) of one call to its accumulators:
    ``per[proj][e]`` (made by ``make(columns, device)`` on first use, then ``.add(x)``), and
    counts its tokens in ``tokens[e]``."""
    for e in range(len(tokens)):
        got = routed_inputs(module, hidden, idx, e)
        if got is None:
            continue
        for p, x in zip(("gate_up", "down"), got):
            if per[p][e] is None:
                per[p][e] = make(x.shape[-1], x.device)
            per[p][e].add(x)
        tokens[e] += got[0].shape[0]


class ExpertsObserver:
    """Per-expert Hessians of the gate_up and down inputs of one fused experts module,
    accumulated from its calls (a forward pre-hook)."""

    def __init__(self, module: nn.Module, num_experts: int):
        self.module = module
        self.num_experts = num_experts
        self.acc: dict[str, list[HessianAccumulator | None]] = {p: [None] * num_experts for p in ("gate_up", "down")}
        self.tokens = [0] * num_experts

    def __call__(self, module, args, kw) -> None:
        hidden, idx = routed_call(module, args, kw)
        add_routed(module, hidden, idx, self.acc, self.tokens, HessianAccumulator)


def gptq_experts(module: nn.Module, observer: ExpertsObserver, scheme: dict, damp: float,
                 clip_search: bool) -> ExpertsResult:
    """GPTQ of every expert matrix of a fused experts module from the observer's Hessians
    (round to nearest for the experts without tokens); the module's float weights are then
    replaced by their dequantized values."""
    from ..formats import dequantize, quantize_rtn

    E = observer.num_experts
    out = ExpertsResult({"gate_up": [], "down": []}, {"gate_up": [], "down": []},
                        [e for e in range(E) if observer.tokens[e] == 0], list(observer.tokens))
    for p in ("gate_up", "down"):
        param = getattr(module, f"{p}_proj")
        for e in range(E):
            w = expert_weight(module, p, e)
            acc = observer.acc[p][e]
            if acc is None:
                q, err = quantize_rtn(w, scheme["bits"], scheme["group_size"], scheme["symmetric"],
                                      scale_dtype=param.dtype), None
            else:
                r = gptq_quantize(w, acc.hessian(), scheme["bits"], scheme["group_size"], scheme["symmetric"],
                                  damp=damp, act_order=False, clip_search=clip_search, scale_dtype=param.dtype)
                q, err = r.quantized, r.error
            deq = dequantize(q.qweight, q.scales, q.zeros, q.bits, q.group_size, q.in_features, torch.float32)
            with torch.no_grad():
                w.copy_(deq.to(param.dtype))
            out.quantized[p].append(q)
            out.errors[p].append(err)
    return out


def gptq_block(block: nn.Module, inputs, targets: dict[str, tuple[nn.Module, bool, dict]], damp: float,
               act_order: bool, clip_search: bool,
               experts: dict[str, tuple[nn.Module, int, dict]] | None = None) -> dict[str, GPTQResult | ExpertsResult]:
    """GPTQ of the linear layers of one decoder block.

    ``targets``: {name inside the block: (module, transposed, scheme)}. Hessians of all
    layers are collected in one pass over the block's float inputs (layers that read the
    same tensor share one); the layers' weights are then replaced by their dequantized
    values, so that the block's outputs (the next block's inputs) see the quantized layers.
    ``experts``: {name inside the block: (fused experts module, expert count, scheme)},
    calibrated per expert in the same pass (gptq_experts).
    """
    from .layerwise import hooked_pass

    acc: dict[str, HessianAccumulator] = {}
    last: list = [None, None]  # (input tensor, its accumulator): q/k/v read one tensor

    def observe(name, x):
        if x is last[0]:
            acc[name] = last[1]
            return
        h = acc.get(name) or HessianAccumulator(x.shape[-1], x.device)
        h.add(x)
        acc[name] = h
        last[0], last[1] = x, h

    observers = {n: ExpertsObserver(m, count) for n, (m, count, _) in (experts or {}).items()}
    handles = [m.register_forward_pre_hook(observers[n], with_kwargs=True) for n, (m, _, _) in (experts or {}).items()]
    try:
        hooked_pass(block, inputs, {n: m for n, (m, _, _) in targets.items()}, observe)
    finally:
        for h in handles:
            h.remove()
    results: dict[str, GPTQResult | ExpertsResult] = {}
    hessians: dict[int, Tensor] = {}
    for name, (module, transposed, scheme) in targets.items():
        if name not in acc:
            raise ValueError(f"hfquant: GPTQ calibration never reached {name}")
        H = hessians.setdefault(id(acc[name]), acc[name].hessian())
        w = module.weight.t() if transposed else module.weight
        res = gptq_quantize(w, H, scheme["bits"], scheme["group_size"], scheme["symmetric"], damp=damp,
                            act_order=act_order, clip_search=clip_search, scale_dtype=module.weight.dtype)
        deq = dequantized_weight(res).to(module.weight.dtype)
        module.weight.data.copy_(deq.t() if transposed else deq)
        results[name] = res
    for name, (module, _, scheme) in (experts or {}).items():
        results[name] = gptq_experts(module, observers[name], scheme, damp, clip_search)
    return results


def warn_empty_experts(what: str, empty: dict[str, list[int]]) -> str | None:
    """One warning naming every experts module (and its expert indices) that received no
    calibration token (``empty``: {module name: expert indices}); returns the message (None
    when there is none)."""
    empty = [(n, e) for n, e in empty.items() if e]
    if not empty:
        return None
    count = sum(len(e) for _, e in empty)
    msg = (f"hfquant: {what} calibration routed no tokens to {count} expert{'s' if count > 1 else ''}, rounded to "
           f"nearest instead: " + "; ".join(f"{n} (expert{'s' if len(e) > 1 else ''} {', '.join(map(str, e))})"
                                            for n, e in empty))
    logger.warning(msg)
    return msg


def gptq_model(model: nn.Module, config, targets, tokenizer=None,
               experts=()) -> dict[str, GPTQResult | ExpertsResult]:
    """GPTQ of every target layer inside the model's decoder blocks, block by block, as
    HfQuantConfig asks (calibration windows, damp, act_order, clip_search, per-module
    schemes). ``targets``: (name, module, transposed) from replace.find_targets; ``experts``:
    (name, module, shapes) of fused experts modules from experts.find_experts. Returns
    {module name: result}; targets outside the blocks are not in it (the caller rounds them).
    """
    from .calibration import config_batches
    from .layerwise import calibrate_blocks, linear_layers

    batches = config_batches(model, config, tokenizer, "GPTQ calibration")
    by_id = {id(m): (name, transposed) for name, m, transposed in targets}
    experts_by_id = {id(m): (name, shapes["num_experts"]) for name, m, shapes in experts}
    results: dict[str, GPTQResult | ExpertsResult] = {}

    def process(index, block_name, block, inputs):
        todo, todo_experts = {}, {}
        for n, m in linear_layers(block).items():
            hit = by_id.get(id(m))
            if hit is not None:
                todo[n] = (m, hit[1], config.scheme_for(hit[0]))
        for n, m in block.named_modules():
            hit = experts_by_id.get(id(m))
            if hit is not None:
                todo_experts[n] = (m, hit[1], config.scheme_for(hit[0]))
        for n, r in gptq_block(block, inputs, todo, config.damp, config.act_order, config.clip_search,
                               todo_experts).items():
            results[f"{block_name}.{n}"] = r

    calibrate_blocks(model, batches, process, desc="GPTQ")
    layers = [r.error for r in results.values() if isinstance(r, GPTQResult)]
    layers += [e for r in results.values() if isinstance(r, ExpertsResult) for p in r.errors.values()
               for e in p if e is not None]
    if layers:
        errs = torch.tensor(layers)
        logger.info("hfquant: GPTQ quantized %d matrices; relative output error median %.3g, max %.3g",
                    len(layers), float(errs.median()), float(errs.max()))
    warn_empty_experts("GPTQ", {n: r.empty for n, r in results.items() if isinstance(r, ExpertsResult)})
    return results
