"""AWQ-style activation-aware weight quantization (Lin et al., 2024).

Weights that meet large activations matter most. For layers that read the same input x,
scaling input channel j of their weights by s_j (and dividing x_j by s_j where x is
produced, which is exact) changes how precisely round-to-nearest keeps each channel:
channels with s_j > 1 get finer steps. AWQ searches s = mean|x|^a, normalised to
geometric mean 1, over a grid of a in [0, 1), and keeps the a whose quantized layers
reproduce the float outputs best on calibration tokens: for the layers after a norm
(q/k/v, gate/up) the output of the attention / MLP module that holds them (on the first
calibration windows), for o_proj and down_proj their own output (over all windows, through
the input's second moment). Then, per group of weights, it searches a clipping factor of
the quantization range that minimises the group's output error (not for q/k_proj, as in
the paper's code); asymmetric schemes then refine the minimum and the maximum separately.
Both are folded into the float model (norm weights, v_proj / up_proj rows, clipped
weights); the layers are then rounded to nearest as usual, so the checkpoint is plain
format v1. Clipping is realised by clamping the float weights to the shrunk range, so the
search scores exactly what that clamp and round-to-nearest give (in a symmetric scheme the
scale then comes from the clamped group's own extremes, formats.v1.group_params); a search
that scored another rounding would favour clipping that the checkpoint cannot reproduce.

Blocks are calibrated in order on the outputs of the already rounded previous blocks (the
inputs the quantized model will see), and within a block the MLP's statistics are taken
with the attention's layers already rounded. These choices were measured on the default
model (W4 g128, docs/accuracy.md, "AWQ variants"); the variants that measured worse (the
weight-normalised form s = mean|x|^a / mean|w~|^(1-a), q/k clipping, clipping searched
inside the scale search, finer grids, more loss windows) are not kept.

The scales are folded where the previous op can absorb them, with the rules of
SmoothQuant (algorithms/smoothquant.py): input_layernorm -> q/k/v, v_proj -> o_proj (one
factor per kv channel under grouped-query attention), post_attention_layernorm ->
gate/up, up_proj -> down_proj. Layers without such a previous op get only the clipping.

Fused MoE experts (3-D gate_up_proj [E, 2I, H] / down_proj [E, H, I]) follow the joint
variant of AWQ for mixture-of-experts blocks: the post-attention norm feeds the router and
every expert, so one scale vector is searched for all experts' gate_up matrices together
(and any other layer of the MoE block that reads the norm's output, a shared expert's
gate/up), on the MoE block's output error; it is folded into the norm, and the router's
columns are multiplied by it (exact: the routing does not change). down_proj gets a scale per
expert, searched on the intermediate activations of the tokens routed to that expert and
folded into the "up" half of its gate_up rows. Clipping is searched per expert matrix on its
routed tokens. Experts that receive no calibration token keep the joint scale but get no
down scale and no clipping (round to nearest), and are reported. Expert modules of another
layout (transposed, or with their own gate function, as gpt-oss) get only the clipping.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..formats.v1 import grouped, fake_quantize, group_params, quantize_codes
from ..modeling import attention_geometry, folds_into_norm, input_rotation

logger = logging.getLogger("hfquant")

GRID = 20            # scale exponents a = 0, 1/20, ..., 19/20
CLIP_STEPS = 20      # clipping factors 1, 0.95, ..., 0.5
CLIP_MIN = 0.5
LOSS_WINDOWS = 4     # calibration windows on which the attention / MLP output error is measured


class _InputStats:
    """Mean |x| per channel and the second moment X^T X / tokens (float64 sums) of one
    layer input over all calibration tokens. Output errors of a weight change D are then
    tr(D M D^T) (the squared error per token, averaged), for any D, without the tokens."""

    def __init__(self, k: int, device=None):
        self.abs_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.abs_sum += x.abs().sum(0).double()
        self.xtx += (x.t() @ x).double()
        self.tokens += x.shape[0]

    def mean_abs(self) -> Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    def moment(self) -> Tensor:
        return (self.xtx / max(self.tokens, 1)).float()

    def divide(self, s: Tensor) -> None:
        """The statistics of x / s."""
        s = s.double().to(self.xtx.device)
        self.abs_sum /= s
        self.xtx /= s[:, None] * s[None, :]


def _output_error(D: Tensor, M: Tensor) -> float:
    """Mean squared output error tr(D M D^T) of a weight change D [N, K]."""
    return float(((D @ M) * D).sum())


def _weight(m: nn.Module, transposed: bool) -> Tensor:
    return m.weight.t() if transposed else m.weight


def search_scales(M: Tensor, x_mean: Tensor, weights: list[Tensor], scheme: dict, scale_dtype,
                  tie: tuple[int, int, int] | None = None,
                  loss: Callable[[list[Tensor]], float] | None = None) -> tuple[Tensor, float, float]:
    """The AWQ scale search for layers with weights [N_i, K] that read one input whose
    second moment is M [K, K] and mean |x| per channel x_mean [K].

    ``tie`` = (n_kv, rep, hd): the K channels are n_kv groups of rep heads of hd channels
    whose factors must agree per (kv, channel) (o_proj under grouped-query attention).
    ``loss(weights)``: the error of the module that holds the layers (attention, MLP) with
    these effective weights; by default the layers' own output error tr(D M D^T).
    Returns (s [K], best exponent, error at it relative to the float output power)."""
    W = torch.cat([w.detach().float() for w in weights])
    sizes = [w.shape[0] for w in weights]
    denom = max(_output_error(W, M), 1e-30) if loss is None else 1.0
    xm = x_mean.float()
    if tie is not None:
        n_kv, rep, hd = tie
        xm = xm.view(n_kv, rep, hd).mean(1).reshape(-1)
    best = (None, 0.0, float("inf"))
    for i in range(GRID):
        a = i / GRID
        s = xm.pow(a).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if tie is not None:
            s = s.view(n_kv, 1, hd).expand(n_kv, rep, hd).reshape(-1)
        if not torch.isfinite(s).all():
            continue
        Wq = fake_quantize(W * s, scheme["bits"], scheme["group_size"], scheme["symmetric"], scale_dtype) / s
        err = (_output_error(Wq - W, M) if loss is None else loss(list(Wq.split(sizes)))) / denom
        if err < best[2]:
            best = (s, a, err)
    if best[0] is None:
        return torch.ones_like(x_mean), 0.0, float("nan")
    return best


def _clip_factors() -> list[float]:
    return [1.0 - i / CLIP_STEPS for i in range(int(CLIP_STEPS * (1 - CLIP_MIN)) + 1)]


def _fake_quantize_range(wg: Tensor, bits: int, symmetric: bool, scale_dtype, c_lo: Tensor, c_hi: Tensor) -> Tensor:
    """Round-to-nearest of grouped weights wg [N, G, g] (float32) whose group range is
    shrunk by c_lo (minimum) and c_hi (maximum) [N, G] (symmetric: by c_hi), as
    formats.v1.group_params / quantize_codes compute it for the clamped weights."""
    if symmetric:
        # exactly the checkpoint's path: the weights clamped to [-c max|w|, c max|w|]
        # (_clip_weight), then the scale of their own extremes (group_params)
        c = (wg.abs().amax(-1) * c_hi)[..., None]
        wc = torch.maximum(torch.minimum(wg, c), -c)
        s, z = group_params(wc, bits, True, scale_dtype)
        return (quantize_codes(wc, s, z, bits, True) - z[..., None]) * s[..., None]
    qmax = (1 << bits) - 1
    lo = wg.amin(-1).clamp(max=0.0) * c_lo
    hi = wg.amax(-1).clamp(min=0.0) * c_hi
    s = ((hi - lo) / qmax).to(scale_dtype).float()
    z = torch.clamp(torch.round(-lo / torch.where(s > 0, s, torch.ones_like(s))), 0, qmax)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(wg / safe[..., None]) + z[..., None], 0, qmax)
    return (q - z[..., None]) * s[..., None]


def search_clip(M: Tensor, w: Tensor, scheme: dict, scale_dtype, separate: bool = True) -> tuple[Tensor, Tensor]:
    """Per group clipping factors (c_lo, c_hi) [N, G] in [CLIP_MIN, 1] of the group's
    minimum and maximum, minimising the group's own output error d_g M_gg d_g^T (d_g: the
    group's rounding error, M_gg: its block of the input's second moment M [K, K]). One
    factor for both ends, then (asymmetric schemes, unless ``separate`` is False) each end
    searched in turn, starting from the best common factor."""
    N, K = w.shape
    w = w.detach().float()
    gs = K if scheme["group_size"] == -1 else scheme["group_size"]
    wg = grouped(w, scheme["group_size"])  # [N, G, g]
    G = wg.shape[1]
    Mp = torch.zeros(G * gs, G * gs, dtype=torch.float32, device=M.device)
    Mp[:K, :K] = M.float()
    blocks = torch.stack([Mp[i * gs:(i + 1) * gs, i * gs:(i + 1) * gs] for i in range(G)])  # [G, g, g]
    bits, sym = scheme["bits"], scheme["symmetric"]

    def error(c_lo: Tensor, c_hi: Tensor) -> Tensor:
        d = wg - _fake_quantize_range(wg, bits, sym, scale_dtype, c_lo, c_hi)
        return (torch.einsum("ngk,gkj->ngj", d, blocks) * d).sum(-1)

    c_lo = torch.ones(N, G, device=w.device)
    c_hi = torch.ones(N, G, device=w.device)
    best_err = error(c_lo, c_hi)
    passes = ["both"] + (["hi", "lo", "hi"] if separate and not sym else [])
    for which in passes:
        for c in _clip_factors()[1:]:
            full = torch.full_like(c_lo, c)
            lo_t = full if which in ("both", "lo") else c_lo
            hi_t = full if which in ("both", "hi") else c_hi
            err = error(lo_t, hi_t)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            c_lo = torch.where(better, lo_t, c_lo)
            c_hi = torch.where(better, hi_t, c_hi)
    return c_lo, c_hi


def _clip_weight(m: nn.Module, transposed: bool, c_lo: Tensor, c_hi: Tensor, scheme: dict) -> None:
    """Clamps the weight to its clipped group ranges, so that round-to-nearest of the result
    uses exactly the clipped scales."""
    wc = _clipped(_weight(m, transposed), c_lo, c_hi, scheme)
    with torch.no_grad():
        m.weight.copy_((wc.t() if transposed else wc).to(m.weight.dtype))


def _clipped(w: Tensor, c_lo: Tensor, c_hi: Tensor, scheme: dict) -> Tensor:
    """The weight [N, K] (float32) clamped to its clipped group ranges."""
    w = w.detach().float()
    N, K = w.shape
    wg = grouped(w, scheme["group_size"])
    if scheme["symmetric"]:
        hi = wg.abs().amax(-1) * c_hi
        lo = -hi
    else:
        lo = wg.amin(-1).clamp(max=0.0) * c_lo
        hi = wg.amax(-1).clamp(min=0.0) * c_hi
    return torch.maximum(torch.minimum(wg, hi[..., None]), lo[..., None]).reshape(N, -1)[:, :K]


def _scale_groups(model: nn.Module, block: nn.Module) -> list[tuple[nn.Module, str, list[str], tuple | None]]:
    """(previous op, kind, [linear names inside the block], tie) for the foldable groups."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    norm1 = getattr(block, "input_layernorm", None)
    norm2 = getattr(block, "post_attention_layernorm", None)
    pre_norms = (norm1 is not None and norm2 is not None and not hasattr(block, "pre_feedforward_layernorm")
                 and not hasattr(block, "post_feedforward_layernorm"))
    groups = []
    if attn is not None:
        if pre_norms and folds_into_norm(norm1) and all(isinstance(getattr(attn, p, None), nn.Linear)
                                                        for p in ("q_proj", "k_proj", "v_proj")):
            groups.append((norm1, "norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], None))
        v, o = getattr(attn, "v_proj", None), getattr(attn, "o_proj", None)
        geometry = attention_geometry(model, attn)
        if isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and geometry is not None:
            n_heads, n_kv, hd = geometry
            if v.out_features == n_kv * hd and o.in_features == n_heads * hd:
                groups.append((v, "linear", ["self_attn.o_proj"], (n_kv, n_heads // n_kv, hd)))
    if mlp is not None:
        gate, up, down = (getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj"))
        if pre_norms and folds_into_norm(norm2) and isinstance(gate, nn.Linear) and isinstance(up, nn.Linear):
            groups.append((norm2, "norm", ["mlp.gate_proj", "mlp.up_proj"], None))
        # not where down_proj's input is rotated online: a scale of its columns would not fold into up_proj
        if (isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and up.out_features == down.in_features
                and input_rotation(down) is None):
            groups.append((up, "linear", ["mlp.down_proj"], None))
    return groups


def _first(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _module_loss(module: nn.Module, calls: list, layers: list[nn.Module]) -> Callable[[list[Tensor]], float]:
    """Mean squared error of ``module``'s output on the recorded ``calls`` when ``layers``
    compute with the given weights instead of their own, relative to the float output's
    mean square (the module's weights are restored after each evaluation)."""
    ref = [_first(module(*a, **k)).float() for a, k in calls]
    power = sum(float(r.pow(2).mean()) for r in ref) / len(ref)

    def loss(weights: list[Tensor]) -> float:
        saved = [m.weight.detach().clone() for m in layers]
        try:
            for m, w in zip(layers, weights):
                m.weight.copy_(w.to(m.weight.dtype))
            err = sum(float((_first(module(*a, **k)).float() - r).pow(2).mean()) for (a, k), r in zip(calls, ref))
        finally:
            for m, w in zip(layers, saved):
                m.weight.copy_(w)
        return err / len(ref) / max(power, 1e-30)

    return loss


class _Rounded:
    """Within the context, the named target layers compute with their round-to-nearest
    weights (as the checkpoint will store them); their float weights are restored after."""

    def __init__(self, targets: dict[str, tuple[nn.Module, bool, dict]], names):
        self.layers = [targets[n] for n in names]
        self.saved: list[Tensor] = []

    def __enter__(self):
        for m, transposed, sc in self.layers:
            self.saved.append(m.weight.detach().clone())
            q = fake_quantize(_weight(m, transposed).detach().float(), sc["bits"], sc["group_size"],
                              sc["symmetric"], m.weight.dtype)
            m.weight.copy_((q.t() if transposed else q).to(m.weight.dtype))
        return self

    def __exit__(self, *exc):
        for (m, _, _), w in zip(self.layers, self.saved):
            m.weight.copy_(w)
        return False


class _StatsObserver:
    """hooked_pass's observer: the input statistics of each layer (``stats``); layers that read
    the same tensor one after the other share one object."""

    def __init__(self):
        self.stats: dict[str, _InputStats] = {}
        self._last: tuple = (None, None)

    def __call__(self, name: str, x: Tensor) -> None:
        if x is self._last[0]:
            self.stats[name] = self._last[1]
            return
        st = self.stats.get(name) or _InputStats(x.shape[-1], x.device)
        st.add(x)
        self.stats[name] = st
        self._last = (x, st)


def _collect(block: nn.Module, inputs, modules: dict[str, nn.Module], inspect: dict[str, nn.Module]):
    """One pass of the block over ``inputs``: the input statistics of ``modules`` (layers
    that read one tensor share one object), the calls of the ``inspect`` modules on the
    first LOSS_WINDOWS windows."""
    from .layerwise import hooked_pass

    observe = _StatsObserver()
    seen: dict[str, list] = {n: [] for n in inspect}
    handles = []
    for n, mod in inspect.items():
        def pre(module, args, kw, n=n):
            if len(seen[n]) < LOSS_WINDOWS:
                seen[n].append((args, kw))
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        hooked_pass(block, inputs, modules, observe)
    finally:
        for h in handles:
            h.remove()
    return observe.stats, seen


class _ExpertStats:
    """Input statistics of one fused experts module (a forward pre-hook): of all its tokens,
    and per expert of the tokens routed to it (gate_up and down inputs, the down inputs with
    the module's current float weights)."""

    def __init__(self, num_experts: int):
        self.all: _InputStats | None = None
        self.per: dict[str, list[_InputStats | None]] = {p: [None] * num_experts for p in ("gate_up", "down")}
        self.tokens = [0] * num_experts
        self.input_ptr: int | None = None  # storage of the first call's hidden states

    def __call__(self, module, args, kw) -> None:
        from .gptq import add_routed, routed_call

        hidden, idx = routed_call(module, args, kw)
        if self.input_ptr is None:
            self.input_ptr = hidden.data_ptr()
        if self.all is None:
            self.all = _InputStats(hidden.shape[-1], hidden.device)
        self.all.add(hidden)
        add_routed(module, hidden, idx, self.per, self.tokens, _InputStats)


def _expert_view(module: nn.Module, proj: str, e: int) -> Tensor:
    from .gptq import expert_weight

    return expert_weight(module, proj, e)


class _RoundedExperts:
    """Within the context, the fused experts modules compute with their round-to-nearest
    weights (one matrix per expert); their float weights are restored after."""

    def __init__(self, experts: dict[str, tuple[nn.Module, int, dict]]):
        self.experts = list(experts.values())
        self.saved: list[tuple[Tensor, Tensor]] = []

    def __enter__(self):
        for m, count, sc in self.experts:
            self.saved.append((m.gate_up_proj.detach().clone(), m.down_proj.detach().clone()))
            for p in ("gate_up", "down"):
                for e in range(count):
                    w = _expert_view(m, p, e)
                    w.copy_(fake_quantize(w.detach().float(), sc["bits"], sc["group_size"], sc["symmetric"],
                                          w.dtype).to(w.dtype))
        return self

    def __exit__(self, *exc):
        for (m, _, _), (gu, down) in zip(self.experts, self.saved):
            m.gate_up_proj.copy_(gu)
            m.down_proj.copy_(down)
        return False


def _norm_consumers(owner: nn.Module, experts: nn.Module, hidden: int) -> dict[nn.Module, int]:
    """{module: -1} for the modules of the MoE block ``owner`` with a 2-D weight [*, hidden]
    (router, shared expert layers) besides the experts: the candidate readers of the norm's
    output, whose first input's data_ptr _awq_experts records in place of the -1."""
    return {m: -1 for m in owner.modules() if m is not experts and m is not owner
            and isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2
            and m.weight.shape[-1] == hidden}


def _awq_experts(model: nn.Module, block: nn.Module, inputs, targets: dict, stats: dict, done: list,
                 experts: dict[str, tuple[nn.Module, int, dict]], clip_search: bool, chosen: dict,
                 empty: dict[str, list[int]]) -> None:
    """AWQ of the fused experts modules of one block (see the module docstring), in place on
    their float weights, after the block's other groups; also finishes the other layers of
    the MoE block that read the norm's output (scaled with the experts, then clipped)."""
    from .layerwise import hooked_pass

    norm2 = getattr(block, "post_attention_layernorm", None)
    pre_norms = (getattr(block, "input_layernorm", None) is not None and norm2 is not None
                 and not hasattr(block, "pre_feedforward_layernorm")
                 and not hasattr(block, "post_feedforward_layernorm"))
    owners = {n: block.get_submodule(n.rsplit(".", 1)[0]) if "." in n else block for n in experts}
    estats = {n: _ExpertStats(count) for n, (_, count, _) in experts.items()}
    consumers = {n: _norm_consumers(owners[n], m, m.gate_up_proj.shape[-1]) for n, (m, _, _) in experts.items()}
    calls: dict[str, list] = {n: [] for n in experts}
    handles = []

    def record(store, key):
        def hook(module, args, kw):
            if store[key] == -1:
                x = args[0] if args else next(iter(kw.values()))
                store[key] = x.data_ptr() if isinstance(x, Tensor) else -2
        return hook

    def owner_call(n):
        def hook(module, args, kw):
            if len(calls[n]) < LOSS_WINDOWS:
                calls[n].append((args, kw))
        return hook

    rest = {n: m for n, (m, _, _) in targets.items() if n not in done}
    try:
        for n, (m, _, _) in experts.items():
            handles.append(m.register_forward_pre_hook(estats[n], with_kwargs=True))
            handles.append(owners[n].register_forward_pre_hook(owner_call(n), with_kwargs=True))
            for c in consumers[n]:
                handles.append(c.register_forward_pre_hook(record(consumers[n], c), with_kwargs=True))
        observe = _StatsObserver()
        with _Rounded(targets, done):
            hooked_pass(block, inputs, rest, observe)
    finally:
        for h in handles:
            h.remove()
    stats.update(observe.stats)
    name_of = {id(m): n for n, (m, _, _) in targets.items()}

    for n, (m, count, scheme) in experts.items():
        es = estats[n]
        empty[n] = [e for e in range(count) if es.tokens[e] == 0]
        layout_ok = _halves_layout(m)
        readers = [c for c, ptr in consumers[n].items() if ptr == es.input_ptr]
        dense = [name_of[id(c)] for c in readers if id(c) in name_of]
        same_scheme = all(targets[d][2] == scheme and not targets[d][1] for d in dense)
        if (layout_ok and pre_norms and folds_into_norm(norm2) and es.all is not None and calls[n] and calls[n][0][0]
                and same_scheme
                and all(d not in done for d in dense)):
            a = _joint_gate_up_scale(m, count, scheme, norm2, owners[n], readers, dense, targets, es, calls[n],
                                     stats)
            if a is not None:
                chosen[f"{n}.gate_up_proj"] = a
                for d in dense:
                    chosen[d] = a
        if clip_search and dense:
            _clip_dense(dense, targets, stats)
        done.extend(dense)
        if layout_ok:
            for e in range(count):
                st = es.per["down"][e]
                if st is None:
                    continue
                inter = m.down_proj.shape[-1]
                down = _expert_view(m, "down", e)
                s, _, _ = search_scales(st.moment(), st.mean_abs(), [down], scheme, m.down_proj.dtype)
                up = m.gate_up_proj[e, inter:]
                up.copy_((up.float() / s[:, None]).to(up.dtype))
                b = m._parameters.get("gate_up_proj_bias")
                if b is not None:
                    b[e, inter:].copy_((b[e, inter:].float() / s).to(b.dtype))
                down.copy_((down.float() * s).to(down.dtype))
                st.divide(s)
        if clip_search:
            for p in ("gate_up", "down"):
                for e in range(count):
                    st = es.per[p][e]
                    if st is None:
                        continue
                    w = _expert_view(m, p, e)
                    c_lo, c_hi = search_clip(st.moment(), w, scheme, w.dtype)
                    w.copy_(_clipped(w, c_lo, c_hi, scheme).to(w.dtype))


def _halves_layout(m: nn.Module) -> bool:
    """Whether an experts module computes act(gate) * up from the halves (gate, up) of its
    gate_up [E, 2I, H] output (transformers' default gate), so that scaling up's rows scales
    the intermediate activations."""
    if getattr(m, "is_transposed", False) or not getattr(m, "has_gate", True):
        return False
    fn = getattr(type(m), "_apply_gate", None)
    if fn is None:
        return True
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return False
    return fn is _default_apply_gate


def _clip_dense(names: list[str], targets: dict, stats: dict) -> None:
    for n in names:
        if n in stats:
            m, transposed, scheme = targets[n]
            c_lo, c_hi = search_clip(stats[n].moment(), _weight(m, transposed), scheme, m.weight.dtype)
            _clip_weight(m, transposed, c_lo, c_hi, scheme)


def _joint_gate_up_scale(m: nn.Module, count: int, scheme: dict, norm: nn.Module, owner: nn.Module,
                         readers: list[nn.Module], dense: list[str], targets: dict, es: _ExpertStats, calls: list,
                         stats: dict) -> float | None:
    """Searches one input scale for every expert's gate_up (and the quantized layers among
    ``readers``, the other modules of the MoE block that read the norm's output) on the MoE
    block's output error, folds it into the norm, the experts and every reader; undone (None)
    when the block's float output changes by more than rounding (a reader not found)."""
    dense_mods = [targets[d][0] for d in dense]
    weights = [m.gate_up_proj[e] for e in range(count)] + [d.weight for d in dense_mods]
    ref = [_first(owner(*a, **k)).float() for a, k in calls]
    power = sum(float(r.pow(2).mean()) for r in ref) / len(ref)

    def loss(ws: list[Tensor]) -> float:
        saved = [m.gate_up_proj.detach().clone()] + [d.weight.detach().clone() for d in dense_mods]
        try:
            for e in range(count):
                m.gate_up_proj[e].copy_(ws[e].to(m.gate_up_proj.dtype))
            for d, w in zip(dense_mods, ws[count:]):
                d.weight.copy_(w.to(d.weight.dtype))
            err = sum(float((_first(owner(*a, **k)).float() - r).pow(2).mean()) for (a, k), r in zip(calls, ref))
        finally:
            m.gate_up_proj.copy_(saved[0])
            for d, w in zip(dense_mods, saved[1:]):
                d.weight.copy_(w)
        return err / len(ref) / max(power, 1e-30)

    s, a, _ = search_scales(es.all.moment(), es.all.mean_abs(), weights, scheme, norm.weight.dtype, None, loss)
    if bool((s == 1).all()):
        return a
    touched = [norm.weight, m.gate_up_proj] + [c.weight for c in readers]
    if isinstance(getattr(norm, "bias", None), Tensor):
        touched.append(norm.bias)
    saved = [t.detach().clone() for t in touched]
    norm.weight.copy_((norm.weight.float() / s).to(norm.weight.dtype))
    if isinstance(getattr(norm, "bias", None), Tensor):
        norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))
    m.gate_up_proj.copy_((m.gate_up_proj.float() * s).to(m.gate_up_proj.dtype))
    for c in readers:
        c.weight.copy_((c.weight.float() * s).to(c.weight.dtype))
    # the MoE block's float output on the first window must not change beyond rounding, with
    # its recorded input divided by s as the norm now gives it: a reader of the norm's output
    # that was not found would see x / s
    (x, *rest), kw = calls[0]
    after = _first(owner(x / s.to(x.dtype), *rest, **kw)).float()
    tol = 1e-3 if norm.weight.dtype == torch.float32 else 3e-2
    if float((after - ref[0]).norm() / ref[0].norm().clamp_min(1e-30)) > tol:
        for t, v in zip(touched, saved):
            t.copy_(v)
        logger.info("hfquant: AWQ left the experts' input scale out: the MoE block's output changed when folded")
        return None
    es.all.divide(s)
    for st in es.per["gate_up"]:
        if st is not None:
            st.divide(s)
    for st in {id(stats[d]): stats[d] for d in dense if d in stats}.values():
        st.divide(s)
    return a


@torch.no_grad()
def awq_block(model: nn.Module, block: nn.Module, inputs, targets: dict[str, tuple[nn.Module, bool, dict]],
              clip_search: bool, experts: dict[str, tuple[nn.Module, int, dict]] | None = None,
              empty: dict[str, list[int]] | None = None) -> tuple[dict[str, float], list]:
    """AWQ of one decoder block, in place on its float weights. ``targets``: {name inside
    the block: (module, transposed, scheme)}; ``experts``: {name inside the block: (fused
    experts module, expert count, scheme)}, whose experts without calibration tokens are
    listed in ``empty``. Returns ({name: chosen exponent} of the scaled layers, the next
    block's inputs: the outputs of this block with its layers rounded, as the quantized
    model will compute them)."""
    from .layerwise import run_block

    # the inputs of the attention and MLP modules on the first windows, for the norm groups' loss
    inspect = {n: getattr(block, n) for n in ("self_attn", "mlp") if isinstance(getattr(block, n, None), nn.Module)}
    stats, seen = _collect(block, inputs, {n: m for n, (m, _, _) in targets.items()}, inspect)
    chosen: dict[str, float] = {}
    done: list[str] = []  # layers whose weights are final (scaled and clipped)

    def clip(names):
        if not clip_search:
            return
        for n in names:
            if n not in targets or n not in stats or n in done:
                continue
            if n.endswith(("q_proj", "k_proj")):
                continue  # as the paper's code: their clipping measured worse here too
            m, transposed, scheme = targets[n]
            c_lo, c_hi = search_clip(stats[n].moment(), _weight(m, transposed), scheme, m.weight.dtype)
            _clip_weight(m, transposed, c_lo, c_hi, scheme)

    for prev, kind, names, tie in _scale_groups(model, block):
        if not all(n in targets and n in stats for n in names):
            continue
        mods = [targets[n] for n in names]
        schemes = {tuple(sorted(sc.items())) for _, _, sc in mods}
        if len(schemes) != 1 or any(t for _, t, _ in mods):
            continue  # one search needs one scheme; Conv1D blocks are not of this layout
        if done:
            # statistics and module inputs of the remaining layers with the finished ones rounded
            rest = {n: m for n, (m, _, _) in targets.items() if n not in done}
            with _Rounded(targets, done):
                new_stats, new_seen = _collect(block, inputs, rest, inspect)
            stats.update(new_stats)
            seen.update(new_seen)
        scheme = mods[0][2]
        st = stats[names[0]]
        owner = names[0].split(".")[0]
        loss = _module_loss(inspect[owner], seen[owner], [m for m, _, _ in mods]) \
            if kind == "norm" and seen.get(owner) else None
        s, a, err = search_scales(st.moment(), st.mean_abs(), [m.weight for m, _, _ in mods], scheme,
                                  prev.weight.dtype, tie, loss)
        if tie is not None:
            n_kv, rep, hd = tie
            s_prev = s.view(n_kv, rep, hd)[:, 0, :].reshape(-1)
        else:
            s_prev = s
        # fold: previous op's output (norm weight and bias, or linear rows) / s; layers' columns * s
        prev.weight.copy_((prev.weight.float() / (s_prev if kind == "norm" else s_prev[:, None])).to(prev.weight.dtype))
        if isinstance(getattr(prev, "bias", None), Tensor):
            prev.bias.copy_((prev.bias.float() / s_prev).to(prev.bias.dtype))
        for m, _, _ in mods:
            m.weight.copy_((m.weight.float() * s).to(m.weight.dtype))
        for n in names:
            chosen[n] = a
        # the layers now see x / s (q/k/v share one stats object: update each once)
        for st in {id(stats[n]): stats[n] for n in names}.values():
            st.divide(s)
        # rescaling the rows of a finished layer later (v_proj, up_proj) keeps its rounding error relative
        clip(names)
        done.extend(names)
    if experts:
        _awq_experts(model, block, inputs, targets, stats, done, experts, clip_search, chosen,
                     {} if empty is None else empty)
    clip([n for n in targets if n not in done])
    with _Rounded(targets, list(targets)), _RoundedExperts(experts or {}):
        outputs = run_block(block, inputs)
    return chosen, outputs


def awq_model(model: nn.Module, config, targets, tokenizer=None, experts=()) -> dict[str, float]:
    """AWQ of every target layer inside the model's decoder blocks, block by block, as
    HfQuantConfig asks; changes the float model in place (the caller then rounds it).
    ``experts``: (name, module, shapes) of fused experts modules from experts.find_experts.
    Returns {module name: chosen scale exponent} ("<experts>.gate_up_proj" for the experts'
    joint scale)."""
    from .calibration import config_batches
    from .gptq import warn_empty_experts
    from .layerwise import calibrate_blocks, linear_layers

    batches = config_batches(model, config, tokenizer, "AWQ calibration")
    by_id = {id(m): (name, transposed) for name, m, transposed in targets}
    experts_by_id = {id(m): (name, shapes["num_experts"]) for name, m, shapes in experts}
    chosen: dict[str, float] = {}
    empty: dict[str, list[int]] = {}

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
        block_empty: dict[str, list[int]] = {}
        scaled, outputs = awq_block(model, block, inputs, todo, config.clip_search, todo_experts, block_empty)
        for n, a in scaled.items():
            chosen[f"{block_name}.{n}"] = a
        for n, e in block_empty.items():
            empty[f"{block_name}.{n}"] = e
        return outputs

    calibrate_blocks(model, batches, process, desc="AWQ")
    logger.info("hfquant: AWQ scaled %d layers", len(chosen))
    warn_empty_experts("AWQ", empty)
    return chosen
