"""Offline rotations (QuaRot / SpinQuant style), exact in float.

The residual stream of a pre-norm decoder (RMSNorm, no bias) is rotated by an orthonormal
matrix Q: once each norm's scale weight is folded into the linear layers it feeds (the norm
then has ones), RMSNorm(x Q) = RMSNorm(x) Q, so with

* embedding E <- E Q,
* layers reading the stream (q/k/v, gate/up, routers, experts' gate_up, lm_head): W <- W diag(g) Q,
* layers writing to it (o_proj, down_proj, experts' down): W <- Q^T W, bias b <- b Q,

the float model computes the same function. v_proj's output rows and o_proj's input
columns are rotated per head by a second matrix (the attention mixes tokens, not channels
within a head). The rotations spread outlier channels over all channels, which makes the
weights (and activations) easier to quantize.

Online (``rotation_online=["down_proj"]``, the default with a rotation): the input of each
dense MLP's down_proj (the SiLU-gated activations, where this model's largest outliers are) is
rotated as the model runs by R (HadamardRotation of down_proj's in_features, seed rotation_seed
+ 1; a forward pre-hook, modeling.install_input_rotation), and its weight holds W R^T, so the
pair computes W x. Fused MoE experts' down projections are not rotated online.

The matrices are randomized Hadamard matrices: diag(+-1 from a seeded generator) H / sqrt(n),
H of order n = 2^k * m built by Kronecker products of Sylvester's order 2 and a Paley
construction of order m. Everything is computed in float64 and cast to each parameter's dtype.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

from .. import ops
from ..modeling import attention_geometry, folds_into_norm, install_input_rotation, text_config

logger = logging.getLogger("hfquant")

ROTATIONS = ("hadamard",)
# transforms applied as the model runs (they cannot be folded into weights on both sides)
ONLINE_ROTATIONS = ("down_proj",)
# orders m whose Hadamard matrix is built here (Paley I: m - 1 a prime = 3 mod 4; Paley II:
# m / 2 - 1 a prime = 1 mod 4), up to this bound; n = 2^k * m
_MAX_BASE = 256


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def _paley_kind(m: int) -> str | None:
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "I"
    if m % 8 == 4 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "II"
    return None


def paley_orders() -> tuple[int, ...]:
    """The orders m > 2 whose Hadamard matrix is built by a Paley construction here."""
    return tuple(m for m in range(4, _MAX_BASE + 1, 4) if _paley_kind(m) and m & (m - 1))


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = chi(j - i) over GF(q), q prime (chi: the quadratic character)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


@functools.lru_cache(maxsize=32)
def _paley(m: int) -> Tensor:
    kind = _paley_kind(m)
    if kind == "I":
        q = m - 1
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:] = 1.0
        s[1:, 0] = -1.0
        s[1:, 1:] = _jacobsthal(q)
        h = s + torch.eye(m, dtype=torch.float64)
    else:  # II
        q = m // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:] = 1.0
        c[1:, 0] = 1.0
        c[1:, 1:] = _jacobsthal(q)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        h = torch.kron(c, one) + torch.kron((c == 0).double(), zero)
    if not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)):  # a construction error, not a user's
        raise RuntimeError(f"hfquant: the Paley construction of order {m} is not a Hadamard matrix")
    return h


def hadamard_factorization(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m * 2^k and m 1 or a Paley order, or None where no such split exists."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    k = 1
    while n % (2 * k) == 0:
        k *= 2
    # try the smallest base first: the fewest non-Sylvester factors
    p = k
    while p >= 1:
        m = n // p
        if m == 1 or (m <= _MAX_BASE and _paley_kind(m)):
            return m, p
        p //= 2
    return None


def hadamard_matrix(n: int) -> Tensor:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I), float64; ValueError naming the
    size where none is built here."""
    split = hadamard_factorization(n)
    if split is None:
        raise ValueError(f"hfquant: rotation: no Hadamard matrix of size {n!r} is available (sizes 2^k and "
                         f"2^k times one of {paley_orders()[:12]} ... are)")
    m, p = split
    h = torch.ones(1, 1, dtype=torch.float64)
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while p > 1:
        h = torch.kron(h, sylvester)
        p //= 2
    return h if m == 1 else torch.kron(_paley(m), h)


def random_signs(n: int, generator: torch.Generator) -> Tensor:
    """n random +-1 from ``generator``, float64."""
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).double() * 2 - 1


def random_hadamard(n: int, generator: torch.Generator) -> Tensor:
    """diag(s) H / sqrt(n), s random +-1 from ``generator``: orthonormal, float64 [n, n]."""
    h = hadamard_matrix(n)
    s = random_signs(n, generator)
    return s[:, None] * h / n ** 0.5


# ---------------------------------------------------------------- online rotations


class HadamardRotation:
    """The orthonormal rotation R = diag(s) H_n / sqrt(n) of the last dimension, applied online
    with the fast Walsh-Hadamard op in one call: H_n = H_m (x) H_p (Paley order m, the op's
    ``mix``; Sylvester order p = 2^k; m = 1 for powers of two), s seeded random signs.

    ``forward(x)``: each row x -> H_n (s * x) / sqrt(n); ``inverse(y)``: each row y ->
    s * (H_n^T y) / sqrt(n), which undoes it; ``inverse_`` writes in place where it can. The signs
    come from ``seed``.
    """

    def __init__(self, n: int, seed: int = 0, device=None):
        split = hadamard_factorization(n)
        if split is None:
            raise ValueError(f"hfquant: no Hadamard rotation of size {n!r} is available (sizes 2^k and 2^k times "
                             f"one of {paley_orders()[:12]} ... are)")
        self.n, self.seed = n, seed
        self.m, self.p = split
        self.signs = random_signs(n, torch.Generator().manual_seed(seed)).to(torch.float32)
        # the Paley factor, orthonormal: forward mixes rows of the [m, p] view with it
        self.mix = None if self.m == 1 else (hadamard_matrix(self.m) / self.m ** 0.5).to(torch.float32)
        if device is not None:
            self.to(device)

    def to(self, device) -> HadamardRotation:
        self.signs = self.signs.to(device)
        if self.mix is not None:
            self.mix = self.mix.to(device)
        return self

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.n:
            raise ValueError(f"hfquant: a Hadamard rotation of size {self.n} applied to a last dimension of "
                             f"{x.shape[-1]}")
        if self.signs.device != x.device:
            self.to(x.device)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return ops.hadamard_transform(x, self.signs, mix=self.mix)

    def inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        return ops.hadamard_transform(y, self.signs, inverse=True, mix=self.mix)

    def inverse_(self, y: Tensor) -> Tensor:
        """inverse(y) written into y (in place where the last dimension is contiguous); returns y."""
        self._check(y)
        if y.shape[-1] > 0 and (y.shape[-1] == 1 or y.stride(-1) == 1):
            ops.hadamard_transform_inplace(y, self.signs, inverse=True, mix=self.mix)
        else:
            y.copy_(self.inverse(y))
        return y


def _fwht64(v: Tensor) -> Tensor:
    """The orthonormal Walsh-Hadamard transform of the last dimension (a power of two) in float64,
    in Sylvester's order (the order of hfquant::hadamard_transform and hadamard_matrix)."""
    p = v.shape[-1]
    lead = v.shape[:-1]
    h = 1
    while h < p:
        w = v.reshape(*lead, p // (2 * h), 2, h)
        v = torch.stack((w[..., 0, :] + w[..., 1, :], w[..., 0, :] - w[..., 1, :]), dim=-2).reshape(*lead, p)
        h *= 2
    return v / p ** 0.5


def rotate_rows64(rotation: HadamardRotation, w: Tensor) -> Tensor:
    """rotation.forward of each row of w, computed in float64: w R^T for R the rotation's matrix."""
    v = (w.double() * rotation.signs.double().to(w.device)).reshape(*w.shape[:-1], rotation.m, rotation.p)
    v = _fwht64(v)
    if rotation.mix is not None:
        v = torch.matmul((hadamard_matrix(rotation.m) / rotation.m ** 0.5).to(v.device), v)
    return v.reshape(w.shape)


def online_seed(seed: int) -> int:
    """The seed of the online rotations' signs for a config's rotation_seed."""
    return (seed + 1) % 2 ** 63


def online_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The dense down projections of the decoder layers' MLPs (model.layers.<i>.mlp...down_proj,
    a module with in_features; fused experts excluded), which ``rotation_online=["down_proj"]``
    rotates online."""
    from ..experts import is_fused_experts

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return []
    out = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        for name, m in mlp.named_modules():
            if (name.rsplit(".", 1)[-1] == "down_proj" and isinstance(getattr(m, "in_features", None), int)
                    and not is_fused_experts(m) and not any(is_fused_experts(p) for p in _parents(mlp, name))):
                out.append((f"model.layers.{i}.mlp.{name}", m))
    return out


def _check_online_sizes(targets) -> None:
    for name, m in targets:
        if hadamard_factorization(m.in_features) is None:
            _fail(f"{_where(name, m)}: no Hadamard matrix of size {m.in_features} (its in_features) is available "
                  f"for the online rotation (sizes 2^k and 2^k times one of {paley_orders()[:12]} ... are); "
                  "use rotation_online=[]")


def install_online_rotations(model: nn.Module, config) -> int:
    """The online rotations a config names (``rotation_online``) installed on the model's modules
    (on a reloaded checkpoint, whose weights already hold their inverses); returns how many."""
    online = list(getattr(config, "rotation_online", None) or [])
    if not online or getattr(config, "rotation", None) is None:
        return 0
    targets = online_targets(model)
    _check_online_sizes(targets)
    rotations = _online_rotations(targets, config.rotation_seed)
    for _, m in targets:
        install_input_rotation(m, rotations[m.in_features])
    return len(targets)


def _online_rotations(targets, seed: int) -> dict[int, HadamardRotation]:
    """One HadamardRotation per in_features of the targets (seed online_seed(seed)), shared by them."""
    return {n: HadamardRotation(n, online_seed(seed)) for n in sorted({m.in_features for _, m in targets})}


# ---------------------------------------------------------------- the model


def _where(name: str, module: nn.Module) -> str:
    return f"{name} ({type(module).__name__})"


def _fail(why: str):
    raise ValueError(f"hfquant: rotation: {why}")


def _norm_commutes(norm: nn.Module, n: int) -> bool:
    """Whether the norm with ones for weight commutes with a rotation (RMSNorm does; LayerNorm,
    which subtracts the mean, does not), checked on a probe in float32 (norms compute in it)."""
    import copy

    probe = copy.deepcopy(norm).to(device="cpu", dtype=torch.float32)
    with torch.no_grad():
        probe.weight.fill_(1.0)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, n, generator=g) * 3
        q = random_hadamard(n, g).float()
        # outputs are of size ~1: float32 rounding is ~1e-6, a mean subtracted is ~1e-1
        return bool(((probe(x @ q) - probe(x) @ q).abs().max()) <= 1e-4)


_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_IN, _ATTN_OUT = ("q_proj", "k_proj", "v_proj"), "o_proj"


class _Plan:
    """The checked model structure: what is read from and written to the residual stream."""

    def __init__(self):
        self.ins: list[tuple[nn.Module, str, Tensor, int]] = []   # (module, param, norm weight, H dim)
        self.outs: list[tuple[nn.Module, str, int]] = []          # (module, param, H dim): weight or bias
        self.heads: list[tuple[nn.Module, nn.Module, int, int]] = []  # (v_proj, o_proj, head_dim, n_kv)
        self.norms: list[nn.Module] = []


def _norm_ok(norm: nn.Module, hidden: int) -> bool:
    """A 1-D weight of the hidden size; where it has values, folding and commuting probed too
    (on the meta device, before loading, only the structure is checked)."""
    w = getattr(norm, "weight", None)
    if not (isinstance(w, Tensor) and w.ndim == 1 and w.shape[0] == hidden):
        return False
    return w.is_meta or (folds_into_norm(norm) and _norm_commutes(norm, hidden))


def plan_rotation(model: nn.Module) -> tuple[_Plan, nn.Embedding, nn.Module, nn.Module, int, int]:
    """Checks that rotating the model is exact; returns the plan, the embedding, the final norm,
    the output head, the hidden size and head_dim. ValueError naming the module and the reason
    otherwise; nothing is changed. On the meta device (before loading) the structure is checked."""
    from ..experts import is_fused_experts
    from ..nn import PackedLinear, QuantEmbedding, QuantExperts

    for name, m in model.named_modules():
        if isinstance(m, (PackedLinear, QuantEmbedding, QuantExperts)) or type(m).__name__ == "FakeQuantLinear":
            _fail(f"the model is already quantized ({_where(name, m)}); rotations apply to the float model")
    for name, m in model.named_modules():
        if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "bias", None), Tensor):
            _fail(f"{_where(name, m)} has a bias, which cannot be folded into the layers that follow it "
                  "(rotations need bias-free RMSNorm pre-norms)")
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    final = getattr(base, "norm", None)
    if not (isinstance(layers, nn.ModuleList) and isinstance(embed, nn.Embedding) and isinstance(head, nn.Linear)
            and isinstance(final, nn.Module)):
        _fail(f"{type(model).__name__} is not a supported architecture (a Llama-style decoder: model.embed_tokens, "
              "model.layers with pre-norms, model.norm, lm_head)")
    hidden = embed.weight.shape[1]
    if hadamard_factorization(hidden) is None:
        hadamard_matrix(hidden)  # raises, naming the size
    for name, m in base.named_children():
        if name not in ("embed_tokens", "layers", "norm") and any(True for _ in m.parameters()):
            _fail(f"model.{_where(name, m)} is not part of a Llama-style decoder (its parameters would not "
                  "be rotated)")
    for name, p in base.named_parameters(recurse=False):
        _fail(f"model.{name} is a parameter outside the decoder layers, which the rotation does not handle")
    plan = _Plan()
    head_dim = None
    for i, layer in enumerate(layers):
        lname = f"model.layers.{i}"
        extra = [n for n, c in layer.named_children() if n not in _LAYER_PARTS and any(True for _ in c.parameters())]
        if extra or not _LAYER_PARTS <= {n for n, _ in layer.named_children()}:
            what = f"has {', '.join(extra)}" if extra else "lacks " + ", ".join(
                sorted(_LAYER_PARTS - {n for n, _ in layer.named_children()}))
            _fail(f"{_where(lname, layer)} {what}: only sequential pre-norm layers (input_layernorm, self_attn, "
                  "post_attention_layernorm, mlp) are supported; post-norm layouts cannot be rotated exactly")
        for norm_name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, norm_name)
            if not _norm_ok(norm, hidden):
                _fail(f"{_where(f'{lname}.{norm_name}', norm)} cannot be folded (a norm whose output scales with "
                      "its weight and commutes with a rotation, RMSNorm, is needed)")
            plan.norms.append(norm)
        attn, mlp = layer.self_attn, layer.mlp
        g1, g2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        projs = {p: getattr(attn, p, None) for p in (*_ATTN_IN, _ATTN_OUT)}
        if not all(isinstance(m, nn.Linear) for m in projs.values()):
            _fail(f"{_where(f'{lname}.self_attn', attn)} is not supported (q_proj, k_proj, v_proj and o_proj "
                  "linear layers are needed)")
        for n, c in attn.named_children():
            if n not in projs and n not in ("q_norm", "k_norm") and any(True for _ in c.parameters()):
                _fail(f"{_where(f'{lname}.self_attn.{n}', c)} is not supported inside the attention")
        for p in _ATTN_IN:
            plan.ins.append((projs[p], "weight", g1, 1))
        plan.outs.append((projs[_ATTN_OUT], "weight", 0))
        if projs[_ATTN_OUT].bias is not None:
            plan.outs.append((projs[_ATTN_OUT], "bias", 0))
        geometry = attention_geometry(model, attn)
        if geometry is None:
            _fail(f"{_where(f'{lname}.self_attn', attn)}: the model config gives no attention geometry")
        n_heads, n_kv, hd = geometry
        if projs["v_proj"].out_features != n_kv * hd or projs["o_proj"].in_features != n_heads * hd:
            _fail(f"{lname}.self_attn: v_proj/o_proj do not match {n_kv} kv heads of {hd}")
        if hadamard_factorization(hd) is None:
            _fail(f"no Hadamard matrix of size {hd} (head_dim) is available for the per-head rotation")
        head_dim = hd
        plan.heads.append((projs["v_proj"], projs[_ATTN_OUT], hd, n_kv))
        _plan_mlp(plan, f"{lname}.mlp", mlp, g2, hidden, is_fused_experts)
    if not _norm_ok(final, hidden):
        _fail(f"{_where('model.norm', final)} cannot be folded (an RMSNorm is needed)")
    plan.norms.append(final)  # lm_head's bias, if any, is on its output: unaffected
    return plan, embed, final, head, hidden, head_dim


def _plan_mlp(plan: _Plan, where: str, mlp: nn.Module, g: Tensor, hidden: int, is_fused_experts) -> None:
    for name, m in mlp.named_modules():
        full = f"{where}.{name}" if name else where
        if is_fused_experts(m):
            t = bool(getattr(m, "is_transposed", False))
            plan.ins.append((m, "gate_up_proj", g, 1 if t else 2))
            plan.outs.append((m, "down_proj", 2 if t else 1))
            if m._parameters.get("down_proj_bias") is not None:
                plan.outs.append((m, "down_proj_bias", 1))
            continue
        if any(is_fused_experts(p) for p in _parents(mlp, name)):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.ndim == 1 and pname.endswith("bias"):
                if name.rsplit(".", 1)[-1] == "down_proj":
                    plan.outs.append((m, pname, 0))
                continue  # other biases are on outputs that are not the residual stream
            if name.rsplit(".", 1)[-1] == "down_proj" and p.ndim == 2 and p.shape[0] == hidden:
                plan.outs.append((m, pname, 0))
            elif p.ndim == 2 and p.shape[1] == hidden:
                plan.ins.append((m, pname, g, 1))
            elif p.ndim >= 2 or p.shape[0] == hidden:
                _fail(f"{full}.{pname} {tuple(p.shape)} ({type(m).__name__}): cannot tell whether it reads or "
                      "writes the residual stream")


def _parents(root: nn.Module, name: str):
    parts = name.split(".") if name else []
    m = root
    for part in parts[:-1]:
        m = getattr(m, part)
        yield m


def _rotate_dim(t: Tensor, q: Tensor, dim: int) -> Tensor:
    """t with its dimension ``dim`` mixed by q: the vectors along it go x -> x q. For a weight
    [N, H] read from the stream this is W q; for one [H, N] writing to it, q^T W."""
    return (t.movedim(dim, -1) @ q).movedim(-1, dim)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, online: tuple[str, ...] | list[str] = ()) -> None:
    """Folds the pre-norm scales and rotates the residual stream and v/o per head, in place, and
    with ``online=["down_proj"]`` rotates the dense down projections' inputs online (see the
    module docstring). Raises ValueError before changing anything where the model cannot be
    rotated exactly."""
    plan, embed, final, head, hidden, head_dim = plan_rotation(model)
    for o in online:
        if o not in ONLINE_ROTATIONS:
            _fail(f"online rotation {o!r} is not supported (use {list(ONLINE_ROTATIONS)})")
    downs = online_targets(model) if "down_proj" in online else []
    _check_online_sizes(downs)
    gen = torch.Generator().manual_seed(seed)
    q = random_hadamard(hidden, gen)
    head_qs = [random_hadamard(hd, gen) for _, _, hd, _ in plan.heads]
    tied = head.weight is embed.weight
    g_final = final.weight.detach().double()

    def dev(t: Tensor, x: Tensor) -> Tensor:
        return t.to(x.device)

    new: list[tuple[nn.Module, str, Tensor]] = []
    for m, pname, g, dim in plan.ins:
        p = getattr(m, pname)
        shape = [1] * p.ndim
        shape[dim] = -1
        w = p.detach().double() * dev(g.detach().double(), p).view(shape)
        new.append((m, pname, _rotate_dim(w, dev(q, p), dim)))
    for m, pname, dim in plan.outs:
        p = getattr(m, pname)
        new.append((m, pname, _rotate_dim(p.detach().double(), dev(q, p), dim)))
    done = {(id(m), pname): i for i, (m, pname, _) in enumerate(new)}
    for (v, o, hd, n_kv), qh in zip(plan.heads, head_qs):
        i = done[(id(v), "weight")]
        w = new[i][2]
        new[i] = (v, "weight", (dev(qh, w).T @ w.view(n_kv, hd, -1)).reshape(w.shape))
        if v.bias is not None:
            b = v.bias.detach().double()
            new.append((v, "bias", (b.view(n_kv, hd) @ dev(qh, b)).reshape(-1)))
        j = done[(id(o), "weight")]
        w = new[j][2]
        new[j] = (o, "weight", (w.view(w.shape[0], -1, hd) @ dev(qh, w)).reshape(w.shape))
    e = embed.weight.detach().double()
    new_embed = e @ dev(q, e)
    w = head.weight.detach().double() * dev(g_final, head.weight)
    new_head = w @ dev(q, w)
    untie = tied and not torch.equal(g_final, torch.ones_like(g_final))
    rotations = _online_rotations(downs, seed)
    for _, d in downs:  # W <- W R^T on the columns (after the rows' rotation above)
        i = done[(id(d), "weight")]
        new[i] = (d, "weight", rotate_rows64(rotations[d.in_features], new[i][2]))

    # nothing has changed up to here; now write
    for m, pname, t in new:
        getattr(m, pname).copy_(t.to(getattr(m, pname).dtype))
    for norm in plan.norms:
        norm.weight.fill_(1.0)
    embed.weight.copy_(new_embed.to(embed.weight.dtype))
    if untie:
        head.weight = nn.Parameter(new_head.to(embed.weight.dtype), requires_grad=embed.weight.requires_grad)
        _untie(model)
    elif not tied:
        head.weight.copy_(new_head.to(head.weight.dtype))
    for _, d in downs:
        install_input_rotation(d, rotations[d.in_features])
    logger.info("hfquant: rotated the residual stream (Hadamard %d) and v/o per head (Hadamard %d), seed %d%s%s",
                hidden, head_dim, seed, "; lm_head untied from the embedding" if untie else "",
                f"; {len(downs)} down_proj inputs rotated online" if downs else "")


def _untie(model: nn.Module) -> None:
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied:
        for key in [k for k in tied if k.endswith(".weight")]:
            if isinstance(model.get_submodule(key.removesuffix(".weight")), nn.Linear):
                tied.pop(key)
    for cfg in {id(c): c for c in (getattr(model, "config", None), text_config(model)) if c is not None}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def check_rotation_args(rotation, seed, online=()) -> None:
    """ValueError naming a bad ``rotation`` / ``rotation_seed`` / ``rotation_online`` of HfQuantConfig."""
    if rotation is not None and rotation not in ROTATIONS:
        raise ValueError(f"HfQuantConfig: rotation={rotation!r} is not supported (use None or one of {ROTATIONS})")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"HfQuantConfig: rotation_seed={seed!r} must be in [0, 2^63)")
    bad = [o for o in online if o not in ONLINE_ROTATIONS]
    if bad:
        raise ValueError(f"HfQuantConfig: rotation_online={list(online)!r}: {bad[0]!r} is not supported (use a "
                         f"subset of {list(ONLINE_ROTATIONS)})")
    if online and rotation is None:
        raise ValueError(f"HfQuantConfig: rotation_online={list(online)!r} needs rotation='hadamard'")


def check_rotatable(model: nn.Module, config) -> None:
    """Before loading (meta device): refuses a model the config's rotation cannot serve."""
    if getattr(config, "rotation", None) is not None:
        plan_rotation(model)
        if "down_proj" in (getattr(config, "rotation_online", None) or ()):
            _check_online_sizes(online_targets(model))


def apply_rotation(model: nn.Module, config) -> None:
    """The config's rotation (``rotation``, ``rotation_seed``) on a float model; nothing if unset."""
    if getattr(config, "rotation", None) is None:
        return
    rotate_model(model, config.rotation_seed, getattr(config, "rotation_online", None) or ())
