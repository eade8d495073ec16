"""Mixed precision: bits per layer from measured sensitivity, under an average-bits budget.

Sensitivity ("fisher", the default) is a second-order estimate of how much the model's loss
grows when one layer is quantized to b bits. For a linear layer y = W x, a weight error dW
changes the loss by about 1/2 E[(g^T dW x)^2] (g = dLoss/dy; the Fisher approximation of
the Hessian). Taking the output gradients and the inputs as uncorrelated across channels,

    E_l(b) = sum_{n,k} F_n * D_k * dW_b[n, k]^2,   F_n = sum_t g_{t,n}^2,  D_k = sum_t x_{t,k}^2 / T,

with dW_b the actual round-to-nearest error of the layer at b bits (its group size and
symmetry). F and D come from one forward and backward pass of the float model over the
calibration windows (hooks; no weight changes). A token embedding E counts twice when a
tied lm_head shares it: as the lm_head (above) and as the lookup, sum_t sum_k G_{t,k}
dE_b[id_t, k]^2 with G the gradient at the embedding's output.

"variance" is data free (the classic rate-distortion allocation the bit-allocation papers
start from): E_l(b) = numel_l * Var(W_l) * 2^(-2b).

The allocation minimises sum_l E_l(b_l) subject to sum_l cost_l(b_l) <= target_bits * sum_l
numel_l, where cost counts every stored bit: codes, scales (in the model's dtype) and zero
points. It is a knapsack, solved by dynamic programming over the budget in 8192 steps (costs
rounded up, so the result fits), then the few bits the rounding left are spent greedily. The result is written into ``config.modules_override`` (one
entry per layer), so the checkpoint reloads without calibration.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..formats.v1 import fake_quantize, num_groups
from ..modeling import is_listed

logger = logging.getLogger("hfquant")


@dataclass
class LayerStats:
    """What sensitivity needs of one quantized tensor [N, K]."""
    name: str
    weight: Tensor  # the float weight [N, K] (a view; not copied)
    out_sq: Tensor | None = None  # F [N]
    in_sq: Tensor | None = None  # D [K]
    lookup_ids: list[Tensor] = field(default_factory=list)  # embedding: token ids per window
    lookup_gsq: list[Tensor] = field(default_factory=list)  # embedding: G [T, K] per window
    tokens: int = 0


def _weight_of(module: nn.Module, transposed: bool) -> Tensor:
    w = module.weight.detach()
    return w.t() if transposed else w


@torch.enable_grad()
def collect_fisher(model: nn.Module, batches, linears: dict[str, tuple[nn.Module, bool]],
                   embeddings: dict[str, nn.Module]) -> dict[str, LayerStats]:
    """One forward + backward of the float model per calibration window (loss: next-token
    cross entropy), accumulating F (output gradients squared) and D (inputs squared) of each
    linear layer, and G (output gradients squared, per token) of each embedding."""
    stats = {n: LayerStats(n, _weight_of(m, t)) for n, (m, t) in linears.items()}
    for n, m in embeddings.items():
        stats[n] = LayerStats(n, m.weight.detach())
    handles = []
    current_ids: list[Tensor] = []

    def linear_hooks(name: str, module: nn.Module, transposed: bool):
        st = stats[name]

        def fwd(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            sq = (x * x).sum(0)
            st.in_sq = sq if st.in_sq is None else st.in_sq + sq
            st.tokens += x.shape[0]

        def bwd(mod, grad_in, grad_out):
            g = grad_out[0].detach().reshape(-1, grad_out[0].shape[-1]).to(torch.float32)
            sq = (g * g).sum(0)
            st.out_sq = sq if st.out_sq is None else st.out_sq + sq

        handles.append(module.register_forward_hook(fwd))
        handles.append(module.register_full_backward_hook(bwd))

    def embedding_hooks(name: str, module: nn.Module):
        st = stats[name]

        def fwd(mod, args, out):
            # the lookup's output must carry a gradient (nothing else in the model requires one)
            return out.detach().requires_grad_(True)

        def bwd(mod, grad_in, grad_out):
            g = grad_out[0].detach().reshape(-1, grad_out[0].shape[-1]).to(torch.float32)
            st.lookup_gsq.append(g * g)
            st.lookup_ids.append(current_ids[-1].reshape(-1))

        handles.append(module.register_forward_hook(fwd))
        handles.append(module.register_full_backward_hook(bwd))

    for n, (m, t) in linears.items():
        linear_hooks(n, m, t)
    for n, m in embeddings.items():
        embedding_hooks(n, m)
    if not embeddings:
        # without a quantized embedding, make the first embedding's output require grad
        first = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if first is not None:
            handles.append(first.register_forward_hook(lambda mod, a, out: out.detach().requires_grad_(True)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="sensitivity (forward + backward)"):
            ids = batch.to(device)
            current_ids.append(ids)
            out = model(ids, labels=ids, use_cache=False) if _takes_labels(model) else None
            if out is None or getattr(out, "loss", None) is None:
                raise ValueError("hfquant: mixed precision with sensitivity='fisher' needs a causal LM that returns a "
                                 "loss for labels=input_ids; use sensitivity='variance' for other models")
            if not out.loss.requires_grad:
                raise ValueError("hfquant: the model's loss does not depend on any hooked layer; "
                                 "use sensitivity='variance'")
            with warnings.catch_warnings():
                # expected for the embeddings: their inputs (token ids) carry no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                out.loss.backward()
            current_ids.pop()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def _takes_labels(model: nn.Module) -> bool:
    import inspect

    return "labels" in inspect.signature(model.forward).parameters


def rtn_error(w: Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype) -> Tensor:
    """dW [N, K] of round-to-nearest at these settings (float32)."""
    return fake_quantize(w, bits, group_size, symmetric, scale_dtype) - w.to(torch.float32)


def fisher_error(st: LayerStats, bits: int, group_size: int, symmetric: bool, scale_dtype,
                 as_lookup: bool = False) -> float:
    """E_l(b) of one tensor: the linear form, plus the lookup form for an embedding."""
    dw2 = rtn_error(st.weight, bits, group_size, symmetric, scale_dtype).square_()
    e = 0.0
    if st.out_sq is not None and st.in_sq is not None:
        e += float(st.out_sq @ dw2 @ (st.in_sq / max(st.tokens, 1)))
    if as_lookup and st.lookup_ids:
        for ids, g in zip(st.lookup_ids, st.lookup_gsq):
            e += float((dw2[ids] * g).sum())
    return e


def variance_error(w: Tensor, bits: int) -> float:
    return float(w.numel() * w.to(torch.float32).var() * 2.0 ** (-2 * bits))


def stored_bits(n: int, k: int, bits: int, group_size: int, symmetric: bool, scale_bits: int) -> int:
    """Bits a layer [n, k] takes in the checkpoint: codes, scales, zero points."""
    groups = num_groups(k, group_size)
    return n * k * bits + n * groups * (scale_bits + (0 if symmetric else 8))


@dataclass
class Option:
    bits: int
    error: float
    cost: int


def allocate(options: dict[str, list[Option]], budget: float, fixed_cost: int = 0, units: int = 8192) -> dict[str, int]:
    """Bits per layer minimising the summed error with summed cost <= budget (see module doc).

    A knapsack solved by dynamic programming over the budget cut into ``units`` steps, each
    layer's cost rounded up to whole steps (so the result always fits), then the part of the
    budget the rounding left is spent greedily on the upgrades with the best error reduction
    per bit. Raises ValueError when even the cheapest choice exceeds the budget."""
    cheapest = fixed_cost + sum(min(o.cost for o in opts) for opts in options.values())
    if cheapest > budget:
        raise ValueError(f"cheapest assignment needs {cheapest} bits, over the budget of {budget:.0f}")
    names = list(options)
    room = budget - fixed_cost
    unit = max(room / units, 1e-9)
    inf = float("inf")
    dp = torch.full((units + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0
    picks = []
    for n in names:
        best = torch.full_like(dp, inf)
        arg = torch.zeros(units + 1, dtype=torch.uint8)
        for i, o in enumerate(options[n]):
            c = math.ceil(o.cost / unit - 1e-9)
            if c > units:
                continue
            cand = torch.full_like(dp, inf)
            cand[c:] = dp[:units + 1 - c] + o.error
            better = cand < best
            best = torch.where(better, cand, best)
            arg[better] = i
        dp = best
        picks.append(arg)
    s = int(torch.argmin(dp))
    if not math.isfinite(float(dp[s])):
        # the rounding made every assignment look too expensive: start from the cheapest one
        chosen = {n: min(options[n], key=lambda o: o.cost) for n in names}
    else:
        chosen = {}
        for n, arg in zip(reversed(names), reversed(picks)):
            o = options[n][int(arg[s])]
            chosen[n] = o
            s -= math.ceil(o.cost / unit - 1e-9)
    left = room - sum(o.cost for o in chosen.values())
    while True:
        move = None
        for n, cur in chosen.items():
            for o in options[n]:
                extra = o.cost - cur.cost
                if 0 < extra <= left and o.error < cur.error:
                    gain = (cur.error - o.error) / extra
                    if move is None or gain > move[0]:
                        move = (gain, n, o)
        if move is None:
            break
        _, n, o = move
        left -= o.cost - chosen[n].cost
        chosen[n] = o
    return {n: chosen[n].bits for n in names}


def _scale_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def allocate_bits(model: nn.Module, config, targets, embeds, heads: dict[str, str], tokenizer=None) -> dict:
    """Chooses bits per layer for ``method="mixed"`` and writes them into
    ``config.modules_override``; returns a report {name: {"bits", "numel", "errors"}}.

    targets: (name, module, transposed) of the linear layers; embeds: (name, nn.Embedding);
    heads: {lm_head: embedding} tied heads (they share the embedding's table and its bits)."""
    candidates = sorted(config.mixed_bits)
    gs, sym = config.group_size, config.symmetric
    user = {k: dict(v) for k, v in config.modules_override.items()}
    tensors: dict[str, tuple[Tensor, nn.Module, bool]] = {}
    for name, module, transposed in targets:
        tensors[name] = (_weight_of(module, transposed), module, transposed)
    for name, module in embeds:
        tensors[name] = (module.weight.detach(), module, False)
    fixed = {n for n in tensors if is_listed(n, user)}  # the rule of scheme_for: a block fixes its layers

    total = sum(w.numel() for w, _, _ in tensors.values())
    budget = config.target_bits * total
    scale_bits = _scale_bits(next(iter(tensors.values()))[0].dtype)

    stats = batches = None
    if config.sensitivity == "fisher":
        from .calibration import config_batches

        batches = config_batches(model, config, tokenizer, "mixed-precision sensitivity")
        linears = {n: (m, t) for n, (w, m, t) in tensors.items() if not isinstance(m, nn.Embedding)}
        # a tied lm_head is measured as the linear layer it is (its gradients and inputs)
        head_modules = {h: (model.get_submodule(h), False) for h in heads}
        stats = collect_fisher(model, batches, {**linears, **head_modules},
                               {n: m for n, (w, m, t) in tensors.items() if isinstance(m, nn.Embedding)})
        for h, e in heads.items():
            # the head's statistics belong to the table it shares
            stats[e].out_sq, stats[e].in_sq, stats[e].tokens = stats[h].out_sq, stats[h].in_sq, stats[h].tokens

    options: dict[str, list[Option]] = {}
    fixed_cost = 0
    report = {}
    for name, (w, module, transposed) in tqdm(tensors.items(), desc="mixed precision: errors per bits"):
        n, k = w.shape
        if name in fixed:
            s = config.scheme_for(name)
            fixed_cost += stored_bits(n, k, s["bits"], s["group_size"], s["symmetric"], scale_bits)
            report[name] = {"bits": s["bits"], "numel": w.numel(), "fixed": True}
            continue
        opts = []
        for b in candidates:
            if config.sensitivity == "fisher":
                err = fisher_error(stats[name], b, gs, sym, w.dtype, as_lookup=isinstance(module, nn.Embedding))
            else:
                err = variance_error(w, b)
            opts.append(Option(b, err, stored_bits(n, k, b, gs, sym, scale_bits)))
        options[name] = opts
        report[name] = {"numel": w.numel(), "errors": {o.bits: o.error for o in opts}}
    if config.sensitivity == "fisher" and options:
        _calibrate_to_measured_loss(model, batches, tensors, options, report, config)
    try:
        chosen = allocate(options, budget, fixed_cost)
    except ValueError as e:
        raise ValueError(f"hfquant: target_bits={config.target_bits} cannot be met with bits {candidates} at "
                         f"group_size={gs} ({e}; {total} weights)") from None
    for name, b in chosen.items():
        report[name]["bits"] = b
        config.modules_override[name] = {"bits": b}
    spent = fixed_cost + sum(next(o.cost for o in options[n] if o.bits == b) for n, b in chosen.items())
    hist = {b: sum(report[n]["numel"] for n in chosen if chosen[n] == b) / total for b in candidates}
    logger.info("hfquant: mixed precision: %.3f stored bits per weight (target %.3f); share of weights %s",
                spent / total, config.target_bits, {b: round(v, 3) for b, v in hist.items()})
    config.mixed_report = {"stored_bits_per_weight": spent / total, "weights": total}
    return report


MEASURE_WINDOWS = 8


@torch.no_grad()
def _mean_loss(model: nn.Module, batches) -> float:
    device = next(model.parameters()).device
    losses = [float(model(b.to(device), labels=b.to(device), use_cache=False).loss) for b in batches]
    return sum(losses) / len(losses)


@torch.no_grad()
def _calibrate_to_measured_loss(model, batches, tensors, options, report, config) -> None:
    """Puts the estimates on the scale of measured loss changes (nats per token).

    The Fisher estimate ranks the linear layers well but its diagonal, independent-error
    form misjudges tensors whose errors reach the loss through many paths; on the default
    model it put the tied embedding table at 0.14x the summed linear layers' estimate where
    quantizing them measured 0.5x. So: the loss is measured on the calibration windows
    (up to 8) with all linear layers fake-quantized at the candidate bits nearest below the
    target, which
    fixes the scale of every linear estimate, and with each embedding table fake-quantized
    at each candidate bits, which replaces its estimate. Errors stay non-increasing in bits."""
    windows = batches[:MEASURE_WINDOWS]
    base = _mean_loss(model, windows)
    cands = sorted(config.mixed_bits)
    mid = max([b for b in cands if b <= config.target_bits] or cands[:1])
    gs, sym = config.group_size, config.symmetric
    linear = [n for n in options if not isinstance(tensors[n][1], nn.Embedding)]
    tables = [n for n in options if isinstance(tensors[n][1], nn.Embedding)]

    def fake(names, bits):
        saved = {}
        for n in names:
            m = tensors[n][1]
            saved[n] = m.weight.data
            w = tensors[n][0]
            q = fake_quantize(w, bits, gs, sym, w.dtype).to(w.dtype)
            m.weight.data = q.t().contiguous() if tensors[n][2] else q
        return saved

    def restore(saved):
        for n, data in saved.items():
            tensors[n][1].weight.data = data

    if linear:
        saved = fake(linear, mid)
        try:
            delta = _mean_loss(model, windows) - base
        finally:
            restore(saved)
        est = sum(next(o.error for o in options[n] if o.bits == mid) for n in linear)
        if delta > 0 and est > 0:
            scale = delta / est
            for n in linear:
                for o in options[n]:
                    o.error *= scale
                report[n]["errors"] = {o.bits: o.error for o in options[n]}
            logger.info("hfquant: mixed precision: all linear layers at %d bits measured %+.4f nats/token", mid, delta)
    for n in tables:
        floor = 0.0
        for o in sorted(options[n], key=lambda o: -o.bits):  # from the most bits down
            saved = fake([n], o.bits)
            try:
                delta = _mean_loss(model, windows) - base
            finally:
                restore(saved)
            floor = max(floor, delta, 0.0)
            o.error = floor + 1e-12 * (16 - o.bits)  # ties broken towards more bits
        report[n]["errors"] = {o.bits: o.error for o in options[n]}
        report[n]["measured"] = True


def bits_per_layer(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, bits, number of weights) of every quantized layer of a loaded model, in order."""
    from ..nn import LutLinear, QuantLinear

    out = []
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, LutLinear)):
            out.append((name, m.bits, m.in_features * m.out_features))
    return out
