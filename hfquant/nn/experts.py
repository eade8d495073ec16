"""QuantExperts: the fused expert tensors of a mixture-of-experts block, quantized.

transformers 5 keeps the experts of a MoE block as 3-D parameters of one module:
``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] (Qwen3-MoE, Mixtral, DeepSeek-V3,
Qwen3-Next), or transposed, ``gate_up_proj`` [E, H, 2I] and ``down_proj`` [E, I, H] with
biases (gpt-oss). QuantExperts holds each as format v1 tensors stacked over the experts,
always in the [E, out, in] orientation (docs/formats.md, expert layout):
``<module>.gate_up_qweight`` / ``_scales`` / ``_zeros`` and ``<module>.down_qweight`` /
``_scales`` / ``_zeros``; biases (``gate_up_proj_bias``, ``down_proj_bias``) stay float.
The forward pass has the experts' signature and computes only the routed experts.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from .. import formats, ops
from ..formats.v1 import STREAM_BITS, num_groups, packed_columns
from .base import int8_activations, offloaded
from .quant_linear import QuantLinear

# packing happens once per module; concurrent first calls pack exactly once
_PACK_LOCK = threading.Lock()

PROJS = ("gate_up", "down")
# config attributes that give a MoE model's number of routed experts
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
# attributes of the original experts module its gate function reads (act_fn is a module)
_GATE_ATTRS = ("alpha", "limit", "has_gate", "has_bias", "is_transposed", "is_concatenated")


def expert_count(config) -> int | None:
    """The number of routed experts a model config gives (its text config's for multimodal ones)."""
    for c in (config, getattr(config, "text_config", None)):
        for key in EXPERT_COUNT_KEYS:
            v = getattr(c, key, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def expert_shapes(name: str, module: nn.Module, num_experts: int | None) -> dict:
    """Checks a fused experts module's 3-D tensors and returns its sizes ({"num_experts",
    "hidden", "intermediate", "transposed", "bias"}); ValueError naming the module otherwise."""
    gu, down = module._parameters.get("gate_up_proj"), module._parameters.get("down_proj")
    where = f"hfquant: {name or type(module).__name__} ({type(module).__name__})"
    if gu is None or down is None:
        raise ValueError(f"{where} has no 3-D parameters gate_up_proj and down_proj (fused experts expected)")
    if gu.dim() != 3 or down.dim() != 3:
        raise ValueError(f"{where}: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} are not both 3-D "
                         "[experts, out, in] tensors")
    if num_experts is None:
        raise ValueError(f"{where} holds fused experts, but the model config gives no expert count "
                         f"({', '.join(EXPERT_COUNT_KEYS)})")
    if gu.shape[0] != num_experts or down.shape[0] != num_experts:
        raise ValueError(f"{where}: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} do not lead with "
                         f"the config's expert count {num_experts}")
    transposed = bool(getattr(module, "is_transposed", False))
    if transposed:  # gate_up [E, H, 2I], down [E, I, H]
        hidden, inter = gu.shape[1], down.shape[1]
        ok = gu.shape[2] == 2 * inter and down.shape[2] == hidden
    else:  # gate_up [E, 2I, H], down [E, H, I]
        hidden, inter = gu.shape[2], down.shape[2]
        ok = gu.shape[1] == 2 * inter and down.shape[1] == hidden
    if not ok:
        layout = "[E, H, 2I] and [E, I, H]" if transposed else "[E, 2I, H] and [E, H, I]"
        raise ValueError(f"{where}: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} do not fit the "
                         f"fused experts layout {layout}")
    if not (hasattr(type(module), "_apply_gate") or isinstance(getattr(module, "act_fn", None), nn.Module)):
        raise ValueError(f"{where} has neither an _apply_gate method nor an act_fn: its activation is unknown")
    bias = module._parameters.get("gate_up_proj_bias") is not None
    return {"num_experts": num_experts, "hidden": int(hidden), "intermediate": int(inter),
            "transposed": transposed, "bias": bias}


def is_fused_experts(module: nn.Module) -> bool:
    """Whether a module holds fused experts: a parameter gate_up_proj or down_proj of 3 dims."""
    return any(isinstance(module._parameters.get(p), nn.Parameter) and module._parameters[p].dim() == 3
               for p in ("gate_up_proj", "down_proj"))


def _default_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return self.act_fn(gate) * up


class QuantExperts(nn.Module):
    """Fused MoE experts with format v1 weights ([E, out, in] per projection); see the module
    docstring for the tensor names. ``original`` is the float experts module it replaces: its
    class's ``_apply_gate`` (the activation between the projections) and the attributes it reads
    (act_fn, alpha, limit) are kept and used as they are."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, bias: bool, bits: int, group_size: int,
                 symmetric: bool, transposed: bool = False, dtype: torch.dtype = torch.float32, device=None,
                 original: nn.Module | None = None, float_weights: bool = False, grid: str = "range"):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden
        self.intermediate_dim = intermediate
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        if grid not in formats.GRIDS:
            raise ValueError(f"hfquant: QuantExperts: grid={grid!r} is not supported (use one of {formats.GRIDS})")
        # how the symmetric scales were placed (formats.v1.GRIDS; "range" for asymmetric experts):
        # "extreme" and "best" store negative scales (checkpoint format version 2)
        self.grid = grid if symmetric else "range"
        self.transposed = transposed
        self._gate_fn = getattr(type(original), "_apply_gate", _default_gate) if original is not None else _default_gate
        if original is not None:
            for a in _GATE_ATTRS:
                if a in vars(original):
                    setattr(self, a, getattr(original, a))
            act = getattr(original, "act_fn", None)
            if isinstance(act, nn.Module):
                self.act_fn = act
            self.source_class = type(original).__name__
        else:
            self.source_class = ""
        qdtype = torch.int8 if (bits == 8 and symmetric) else torch.uint8
        for p in PROJS:
            n, k = self.proj_shape(p)
            G = num_groups(k, group_size)
            qcols = packed_columns(k, bits) if bits in STREAM_BITS else k
            self.register_buffer(f"{p}_qweight", torch.empty(num_experts, n, qcols, dtype=qdtype, device=device))
            self.register_buffer(f"{p}_scales", torch.empty(num_experts, n, G, dtype=dtype, device=device))
            if not symmetric:
                self.register_buffer(f"{p}_zeros", torch.empty(num_experts, n, G, dtype=torch.uint8, device=device))
            if bias:
                setattr(self, f"{p}_proj_bias", nn.Parameter(torch.empty(num_experts, n, dtype=dtype, device=device),
                                                             requires_grad=False))
            else:
                self.register_parameter(f"{p}_proj_bias", None)
            if float_weights:
                # quantize-on-load: the float checkpoint tensor lands here and is replaced by the
                # quantized ones (HfQuantQuantize); it never holds data
                shape = (num_experts, k, n) if transposed else (num_experts, n, k)
                self._parameters[f"{p}_proj"] = nn.Parameter(torch.empty(shape, dtype=dtype, device=device),
                                                             requires_grad=False)
        self._packed = False
        self._register_state_dict_hook(QuantExperts._restore_qweight_hook)

    # -- shapes and names ---------------------------------------------------------------
    def proj_shape(self, proj: str) -> tuple[int, int]:
        """(out, in) of one expert's matrix of a projection ("gate_up" or "down")."""
        return (2 * self.intermediate_dim, self.hidden_dim) if proj == "gate_up" else \
            (self.hidden_dim, self.intermediate_dim)

    def tensor_keys(self) -> tuple[str, ...]:
        """The quantized checkpoint tensors of this module (``<module>.<key>``)."""
        return tuple(f"{p}_{k}" for p in PROJS for k in ("qweight", "scales", "zeros")
                     if k != "zeros" or not self.symmetric)

    def expert_layer(self, proj: str, device="meta") -> QuantLinear:
        """An empty QuantLinear with one expert's shape and scheme for a projection (the form
        Method.quantize_weight takes)."""
        n, k = self.proj_shape(proj)
        return QuantLinear(k, n, False, self.bits, self.group_size, self.symmetric, grid=self.grid,
                           dtype=getattr(self, f"{proj}_scales").dtype, device=device)

    @classmethod
    def from_float(cls, module: nn.Module, num_experts: int, bits: int, group_size: int, symmetric: bool,
                   quantize=None, name: str = "", grid: str = "range") -> "QuantExperts":
        """Quantizes a float experts module. ``quantize(name, layer, w)`` gives one expert
        matrix's tensors (a Method.quantize_weight); plain round to nearest by default."""
        s = expert_shapes(name, module, num_experts)
        gu = module.gate_up_proj.detach()
        new = cls(s["num_experts"], s["hidden"], s["intermediate"], s["bias"], bits, group_size, symmetric, grid=grid,
                  transposed=s["transposed"], dtype=gu.dtype, device=gu.device, original=module)
        for p in PROJS:
            tensors = new.quantize_float(name, p, getattr(module, f"{p}_proj").detach(), quantize)
            for k, t in tensors.items():
                setattr(new, k, t)
            if s["bias"]:
                getattr(new, f"{p}_proj_bias").data.copy_(getattr(module, f"{p}_proj_bias").detach())
        return new

    def quantize_float(self, name: str, proj: str, weight: torch.Tensor, quantize=None) -> dict:
        """The stacked tensors ({"gate_up_qweight": ..., ...}) of a float projection tensor as the
        model holds it ([E, out, in], or [E, in, out] when transposed), one expert at a time."""
        layer = self.expert_layer(proj)
        if quantize is None:
            def quantize(_, lay, w):
                q = formats.quantize_rtn(w, lay.bits, lay.group_size, lay.symmetric, scale_dtype=lay.scales.dtype,
                                         grid=lay.grid)
                return {"qweight": q.qweight, "scales": q.scales, **({} if q.zeros is None else {"zeros": q.zeros})}
        parts = []
        for e in range(weight.shape[0]):
            w = weight[e].t() if self.transposed else weight[e]
            parts.append(quantize(f"{name}.{proj}_proj.{e}", layer, w))
        return {f"{proj}_{k}": torch.stack([t[k] for t in parts]) for k in parts[0]}

    # -- checks and kernel layout -----------------------------------------------------------
    def validate(self, name: str = "") -> None:
        """Raises ValueError naming the tensor when the loaded tensors do not fit the expert layout."""
        name = name or type(self).__name__
        for p in PROJS:
            n, k = self.proj_shape(p)
            tensors = {key: getattr(self, f"{p}_{key}", None) for key in ("qweight", "scales", "zeros")}
            if self._packed:
                tensors["qweight"] = self._canonical_qweight(p)
            for key, t in tensors.items():
                if t is not None and (t.dim() != 3 or t.shape[0] != self.num_experts):
                    raise ValueError(f"hfquant: {name}.{p}_{key} has shape {tuple(t.shape)}; expected "
                                     f"[{self.num_experts}, ...] (one matrix per expert)")
            for e in range(self.num_experts):
                z = tensors["zeros"]
                formats.validate(f"{name}.{p}[expert {e}]", tensors["qweight"][e], tensors["scales"][e],
                                 None if z is None else z[e], self.bits, self.group_size, k, n, self.symmetric,
                                 signed_scales=self.grid != "range")

    @property
    def kernel_bits(self) -> int:
        return 8 if self.bits == 8 else 4

    def _expert_linear(self, proj: str, e: int) -> QuantLinear:
        layer = self.expert_layer(proj)
        z = getattr(self, f"{proj}_zeros", None)
        layer.load_quantized(getattr(self, f"{proj}_qweight")[e], getattr(self, f"{proj}_scales")[e],
                             None if z is None else z[e])
        return layer

    def _kernel_tensors(self, projs: tuple[str, ...] = PROJS) -> dict[str, torch.Tensor]:
        """The kernel layout of ``projs`` ({"<proj>_packed_weight", "<proj>_packed_scales"}):
        ``hfquant::repack`` per expert, stacked."""
        out = {}
        for p in projs:
            if getattr(self, f"{p}_qweight").device.type == "meta":
                raise RuntimeError("hfquant: QuantExperts has no weights yet (still on the meta device)")
            ks = [self._expert_linear(p, e)._kernel_tensors() for e in range(self.num_experts)]
            out[f"{p}_packed_weight"] = torch.stack([k["packed_weight"] for k in ks])
            out[f"{p}_packed_scales"] = torch.stack([k["packed_scales"] for k in ks])
        return out

    def pack(self) -> None:
        """Derives the kernel layout once and releases the canonical qweights."""
        with _PACK_LOCK:
            if self._packed:
                return
            for p in PROJS:  # one projection at a time: its codes released before the next is laid out
                for name, t in self._kernel_tensors((p,)).items():
                    self.register_buffer(name, t, persistent=False)
                del self._buffers[f"{p}_qweight"]
            self._packed = True

    def _offloaded(self) -> bool:
        """Whether accelerate offloads this module's tensors (hfquant.nn.base.offloaded)."""
        return offloaded(self)

    def _kernel(self) -> dict[str, torch.Tensor]:
        """The kernel layout for this call: the packed buffers (packing once on first use), or,
        when accelerate offloads the module, derived from the tensors its hook just loaded."""
        if not self._packed:
            if self._offloaded():
                self.validate()
                return self._kernel_tensors()
            self.pack()
        return {f"{p}_{k}": getattr(self, f"{p}_{k}") for p in PROJS for k in ("packed_weight", "packed_scales")}

    def _canonical_qweight(self, proj: str) -> torch.Tensor:
        if not self._packed:
            return getattr(self, f"{proj}_qweight")
        pw = getattr(self, f"{proj}_packed_weight")
        layer = self.expert_layer(proj)
        out = []
        for e in range(self.num_experts):
            layer.packed_weight = pw[e]
            out.append(layer._qweight_from_kernel())
        return torch.stack(out)

    @staticmethod
    def _restore_qweight_hook(module, state_dict, prefix, local_metadata):
        if module._packed:
            for p in PROJS:
                state_dict[prefix + f"{p}_qweight"] = module._canonical_qweight(p)
        for p in PROJS:  # one key order whether packed or not
            for key in ("qweight", "scales", "zeros", "proj_bias"):
                if prefix + f"{p}_{key}" in state_dict:
                    state_dict[prefix + f"{p}_{key}"] = state_dict.pop(prefix + f"{p}_{key}")
        return state_dict

    def _apply(self, fn, recurse=True):
        # a cast or move changes the canonical tensors; the kernel layout is derived from them
        if self._packed:
            for p in PROJS:
                q = self._canonical_qweight(p)
                del self._buffers[f"{p}_packed_weight"], self._buffers[f"{p}_packed_scales"]
                self.register_buffer(f"{p}_qweight", q)
            self._packed = False
        return super()._apply(fn, recurse)

    # -- compute --------------------------------------------------------------------------
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._gate_fn(self, gate_up)

    def _linear(self, kernel: dict, proj: str, x: torch.Tensor, e: int) -> torch.Tensor:
        n, k = self.proj_shape(proj)
        b = getattr(self, f"{proj}_proj_bias")
        return ops.qlinear(x, kernel[f"{proj}_packed_weight"][e], kernel[f"{proj}_packed_scales"][e],
                           None if b is None else b[e], self.kernel_bits, self.group_size, n, k)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """hidden_states [T, H], top_k_index [T, k] (expert ids), top_k_weights [T, k] -> [T, H]:
        the weighted sum of each token's routed experts (gpt-oss' names router_indices and
        routing_weights are accepted too)."""
        if top_k_index is None:
            top_k_index = kwargs.pop("router_indices")
        if top_k_weights is None:
            top_k_weights = kwargs.pop("routing_weights")
        kernel = self._kernel()
        if hasattr(ops, "qlinear_routed"):
            return self._forward_routed(kernel, hidden_states, top_k_index, top_k_weights)
        return self._forward_loop(kernel, hidden_states, top_k_index, top_k_weights)

    def _forward_loop(self, kernel, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        # one hfquant::qlinear per expert hit, as the experts classes of transformers loop
        E = self.num_experts
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # ids == E mark slots routed nowhere (expert parallelism), as in transformers' experts
            mask = nn.functional.one_hot(top_k_index, num_classes=E + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            if e == E:
                continue
            pos, tok = torch.where(mask[e])
            h = self._apply_gate(self._linear(kernel, "gate_up", hidden_states[tok], e))
            y = self._linear(kernel, "down", h.to(hidden_states.dtype), e)
            y = y * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def _routed(self, kernel: dict, proj: str, x: torch.Tensor, expert_ids: torch.Tensor,
                int8_activations: bool = False) -> torch.Tensor:
        n, k = self.proj_shape(proj)
        op = ops.qlinear_routed_a8 if int8_activations else ops.qlinear_routed
        return op(x, kernel[f"{proj}_packed_weight"], kernel[f"{proj}_packed_scales"], expert_ids,
                  getattr(self, f"{proj}_proj_bias"), self.kernel_bits, self.group_size, n, k)

    def _forward_routed(self, kernel, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        # one row per (token, slot) pair: gate_up on the token's hidden state, down on the
        # pair's own activations, each row through its expert's weights (hfquant::qlinear_routed)
        T, k = top_k_index.shape
        ids = top_k_index.reshape(-1)
        tok = torch.arange(T, device=ids.device).repeat_interleave(k)
        weights = top_k_weights.reshape(-1)
        keep = (ids >= 0) & (ids < self.num_experts)  # id E: a slot routed nowhere (expert parallelism)
        if torch.compiler.is_compiling():  # no data-dependent shapes in a graph: such slots weigh 0
            ids, weights = torch.where(keep, ids, 0), torch.where(keep, weights, torch.zeros_like(weights))
        elif not bool(keep.all()):
            ids, tok, weights = ids[keep], tok[keep], weights[keep]
        out = torch.zeros_like(hidden_states)
        if ids.numel() == 0:
            return out
        a8 = int8_activations(hidden_states, hidden_states.shape[0], self.kernel_bits)  # by tokens, as QuantLinear
        h = self._apply_gate(self._routed(kernel, "gate_up", hidden_states[tok], ids, a8))
        y = self._routed(kernel, "down", h.to(hidden_states.dtype), ids, a8) * weights[:, None]
        return out.index_add_(0, tok, y.to(out.dtype))

    def dequantize_weight(self, proj: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float tensor [E, out, in] of a projection this module computes with."""
        n, k = self.proj_shape(proj)
        q = self._canonical_qweight(proj)
        s = getattr(self, f"{proj}_scales")
        z = getattr(self, f"{proj}_zeros", None)
        return torch.stack([formats.dequantize(q[e], s[e], None if z is None else z[e], self.bits, self.group_size,
                                               k, dtype or s.dtype) for e in range(self.num_experts)])

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"group_size={self.group_size}"
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"bits={self.bits}, {g}, {'symmetric' if self.symmetric else 'asymmetric'}"
                f"{'' if self.grid == 'range' else f', grid={self.grid}'}{', transposed' if self.transposed else ''}")
