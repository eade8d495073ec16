"""Import (convert) of GPTQ, AWQ (GEMM) and compressed-tensors pack-quantized checkpoints
into hfquant's format v1, so that they load with ``from_pretrained`` and run through
hfquant's kernels (docs/formats.md, "Export and import").

The integer codes, zero points and scales are moved, never requantized: the converted
model computes with exactly the weights the source checkpoint stands for (scales are
cast to the output dtype: float16 -> float32 is exact).
"""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import HfQuantConfig
from ..methods import SUPPORTED_GROUP_SIZES, get_method
from ..formats.v1 import num_groups, pack_int4
from . import layouts
from ..fileio import atomic_dir, copy_side_files

SOURCES = ("gptq", "awq", "compressed-tensors")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConvertError(ValueError):
    pass


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConvertError(f"hfquant convert: {path} has no config.json")
    with open(cfg_path) as f:
        return json.load(f)


def _side_quant_config(path: str) -> dict | None:
    """AutoGPTQ's quantize_config.json / AutoAWQ's quant_config.json, for checkpoints whose
    config.json has no quantization_config."""
    for name, source in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p) as f:
                cfg = json.load(f)
            return {"quant_method": source, **cfg}
    return None


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConvertError(f"hfquant convert: {path} has no model.safetensors (nor an index of shards); "
                           "only safetensors checkpoints are read")
    out = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _source_scheme(qcfg: dict) -> dict:
    """bits, group_size, and how the source stores its tensors."""
    source = qcfg.get("quant_method")
    if source == "gptq":
        fmt = qcfg.get("checkpoint_format", qcfg.get("format", "gptq")) or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise ConvertError(f"hfquant convert: GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        return {"kind": "gptq", "bits": int(qcfg["bits"]), "group_size": int(qcfg.get("group_size", -1)),
                "v1": fmt == "gptq"}
    if source == "awq":
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise ConvertError(f"hfquant convert: AWQ version {version!r} is not supported; only the GEMM layout is")
        if not qcfg.get("zero_point", True):
            raise ConvertError("hfquant convert: AWQ without zero points is not supported")
        return {"kind": "awq", "bits": int(qcfg.get("bits", qcfg.get("w_bit", 4))),
                "group_size": int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))}
    if source == "compressed-tensors":
        if qcfg.get("format") != "pack-quantized":
            raise ConvertError(f"hfquant convert: compressed-tensors format {qcfg.get('format')!r} is not supported; "
                               "only pack-quantized")
        return {"kind": "ct", "groups": qcfg.get("config_groups", {})}
    if source == "hfquant":
        raise ConvertError("hfquant convert: the checkpoint is hfquant's own format already; load it with from_pretrained")
    raise ConvertError(f"hfquant convert: quant_method {source!r} is not supported (convert reads {', '.join(SOURCES)})")


def _ct_args(groups: dict, name: str) -> dict:
    """The weight quantization args of the config group targeting ``name``: a group naming it
    first, then one whose regex matches it, then one targeting the class Linear."""
    def rank(g):
        targets = g.get("targets", [])
        if name in targets:
            return 0
        if any(t.startswith("re:") and re.match(t[3:], name) for t in targets):
            return 1
        return 2 if "Linear" in targets else None

    ranked = sorted((r, i) for i, g in enumerate(groups.values()) if (r := rank(g)) is not None)
    if not ranked:
        raise ConvertError(f"hfquant convert: no compressed-tensors config group targets {name}")
    key, g = list(groups.items())[ranked[0][1]]
    w = g.get("weights") or {}
    if w.get("type", "int") != "int" or w.get("num_bits") not in (4, 8):
        raise ConvertError(f"hfquant convert: {name}: compressed-tensors weights {w} are not 4- or 8-bit ints")
    if w.get("strategy") not in ("group", "channel"):
        raise ConvertError(f"hfquant convert: {name}: compressed-tensors strategy {w.get('strategy')!r} "
                           "is not supported (group, channel)")
    if g.get("input_activations"):
        raise ConvertError(f"hfquant convert: {name}: compressed-tensors activation quantization is not "
                           "supported (weight-only schemes only)")
    return {"bits": w["num_bits"], "group_size": -1 if w["strategy"] == "channel" else int(w["group_size"]),
            "group": key}


def _layer(name: str, t: dict[str, torch.Tensor], src: dict) -> dict:
    """The source tensors of one layer -> codes [N, K] (unsigned), zeros [N, G], scales [N, G],
    g_idx [K] or None, bits, group_size, bias."""
    def need(key):
        if key not in t:
            raise ConvertError(f"hfquant convert: the checkpoint has no tensor {name}.{key}")
        return t[key]

    if src["kind"] == "gptq":
        bits, g = src["bits"], src["group_size"]
        qweight, qzeros, scales = need("qweight"), need("qzeros"), need("scales")
        N = qweight.shape[1]
        codes = layouts.gptq_unpack_qweight(qweight, bits)
        zeros = layouts.gptq_unpack_qzeros(qzeros, bits, N, v1=src["v1"])
        scales = scales.t()
        g_idx = t.get("g_idx")
    elif src["kind"] == "awq":
        bits, g = src["bits"], src["group_size"]
        if bits != 4:
            raise ConvertError(f"hfquant convert: AWQ with {bits} bits is not supported (4)")
        qweight, qzeros, scales = need("qweight"), need("qzeros"), need("scales")
        N = qweight.shape[1] * 8
        codes = layouts.awq_unpack_qweight(qweight)
        zeros = layouts.awq_unpack_qzeros(qzeros, N)
        scales = scales.t()
        g_idx = None
    else:
        args = _ct_args(src["groups"], name)
        bits, g = args["bits"], args["group_size"]
        packed, scales, shape = need("weight_packed"), need("weight_scale"), need("weight_shape")
        N, K = (int(v) for v in shape.tolist())
        codes = layouts.ct_unpack(packed, bits, K)
        half = 1 << (bits - 1)
        if "weight_zero_point" in t:
            zeros = layouts.ct_unpack(t["weight_zero_point"].t().contiguous(), bits, N).t().contiguous()
        else:
            zeros = torch.full((N, scales.shape[1]), half, dtype=torch.int32)
        g_idx = t.get("weight_g_idx")
    N, K = codes.shape
    G = num_groups(K, g)
    if tuple(scales.shape) != (N, G):
        raise ConvertError(f"hfquant convert: {name}: scales have shape {tuple(scales.shape)} (as [N, G]); expected "
                           f"({N}, {G}) for in_features {K} and group_size {g}")
    if tuple(zeros.shape) != (N, G):
        raise ConvertError(f"hfquant convert: {name}: zero points have shape {tuple(zeros.shape)}; expected ({N}, {G})")
    if g_idx is not None and tuple(g_idx.shape) != (K,):
        raise ConvertError(f"hfquant convert: {name}.g_idx has shape {tuple(g_idx.shape)}; expected ({K},)")
    return {"codes": codes, "zeros": zeros, "scales": scales, "g_idx": g_idx, "bits": bits, "group_size": g,
            "N": N, "K": K, "bias": t.get("bias"), "ct_group": args["group"] if src["kind"] == "ct" else None}


def _check_group_size(name: str, L: dict) -> None:
    if L["group_size"] not in SUPPORTED_GROUP_SIZES:
        raise ConvertError(f"hfquant convert: {name}: group_size {L['group_size']} is not supported by hfquant "
                           f"(one of {SUPPORTED_GROUP_SIZES})")


def _merge_ct_groups(layers: dict[str, dict]) -> None:
    """Per compressed-tensors config group: the larger group size hfquant supports (a multiple of
    the group's) whose groups, the last one ragged, each repeat one scale and zero point over the
    stored groups in every layer of the config group, and the layers rewritten with it (hfquant's
    export writes a group size that does not divide in_features so: the same weights). Of the
    sizes giving the same numbers of groups, the smallest."""
    by_group: dict[str, list[dict]] = {}
    for L in layers.values():
        if L["ct_group"] is not None and L["group_size"] != -1:
            by_group.setdefault(L["ct_group"], []).append(L)
    for Ls in by_group.values():
        g = Ls[0]["group_size"]
        if any(L["K"] % g for L in Ls):
            continue
        best, counts = None, tuple(L["K"] // g for L in Ls)
        for big in sorted(s for s in SUPPORTED_GROUP_SIZES if s > g and s % g == 0):
            firsts = [torch.arange(num_groups(L["K"], big)) * (big // g) for L in Ls]
            idxs = [torch.arange(L["K"] // g) * g // big for L in Ls]
            if not all(torch.equal(L[t][:, f][:, i], L[t]) for L, f, i in zip(Ls, firsts, idxs)
                       for t in ("zeros", "scales")):
                break
            c = tuple(len(f) for f in firsts)
            if c != counts:
                best, counts = big, c
        if best is not None:
            for L in Ls:
                first = torch.arange(num_groups(L["K"], best)) * (best // g)
                L.update(group_size=best, zeros=L["zeros"][:, first].contiguous(),
                         scales=L["scales"][:, first].contiguous())


def _perm_from_g_idx(name: str, g_idx: torch.Tensor | None, K: int, g: int) -> torch.Tensor | None:
    """None when g_idx is the plain k // group_size; else the permutation that makes each
    group a run of consecutive stored columns (GPTQ act-order)."""
    if g_idx is None:
        return None
    plain = torch.arange(K, dtype=torch.int64) // (K if g == -1 else g)
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, plain):
        return None
    perm = torch.sort(g_idx, stable=True).indices
    if not torch.equal(g_idx[perm], plain):
        raise ConvertError(f"hfquant convert: {name}.g_idx does not give every group {g} columns; hfquant stores "
                           "act-order as a permutation into whole groups and cannot hold this one")
    return perm


def _is_symmetric(L: dict) -> bool:
    """Whether a layer's tensors fit format v1's symmetric scheme (zero points 2^(bits-1); int8
    values -127..127)."""
    half = 1 << (L["bits"] - 1)
    return bool((L["zeros"] == half).all()) and not (L["bits"] == 8 and (L["codes"] == 0).any())


def _to_v1(name: str, L: dict, perm: torch.Tensor | None, dtype: torch.dtype,
           symmetric: bool | None = None) -> tuple[dict, dict]:
    """hfquant tensors of one layer and its scheme (bits, group_size, symmetric); ``symmetric``
    False writes zero points even where the layer is symmetric."""
    bits = L["bits"]
    codes, zeros = L["codes"].to(torch.int64), L["zeros"].to(torch.int64)
    top = (1 << bits) - 1
    if zeros.min() < 0 or zeros.max() > top:
        raise ConvertError(f"hfquant convert: {name}: zero points {zeros.min().item()}..{zeros.max().item()} are "
                           f"outside 0..{top} (a GPTQ v1 checkpoint with a zero point 0 stored as -1?)")
    if perm is not None:
        codes = codes[:, perm]
    symmetric = _is_symmetric(L) if symmetric is None else symmetric
    out = {}
    if bits == 4:
        out["qweight"] = pack_int4(codes.to(torch.uint8))
    elif symmetric:
        out["qweight"] = (codes - 128).to(torch.int8)
    else:
        out["qweight"] = codes.to(torch.uint8)
    scales = L["scales"]
    if not torch.isfinite(scales).all() or (scales < 0).any():
        raise ConvertError(f"hfquant convert: {name}: scales hold NaN, Inf or negative values")
    out["scales"] = scales.to(dtype).contiguous()
    if not symmetric:
        out["zeros"] = zeros.to(torch.uint8).contiguous()
    if perm is not None:
        out["perm"] = perm.to(torch.int32)
    if L["bias"] is not None:
        out["bias"] = L["bias"].to(dtype)
    return {k: v.contiguous() for k, v in out.items()}, {"bits": bits, "group_size": L["group_size"],
                                                         "symmetric": symmetric}


def _meta_model(config: dict):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_cfg = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(hf_cfg)
        except ValueError:
            return AutoModel.from_config(hf_cfg)


def _expert_names(model) -> tuple[dict[str, tuple], dict[str, object]]:
    """The per-expert linears of the model's original checkpoints ({checkpoint name: (experts
    module, proj, expert, half)}, half 0 / 1 the gate / up rows of gate_up) and the fused experts
    modules ({name: module}): transformers' conversion mapping reverted on marker tensors whose
    values are their own ids."""
    from transformers.core_model_loading import revert_weight_conversion

    from ..nn.experts import is_fused_experts

    experts = {n: m for n, m in model.named_modules() if is_fused_experts(m)
               and all(getattr(m._parameters.get(p), "dim", lambda: 0)() == 3 for p in ("gate_up_proj", "down_proj"))}
    markers, ids = {}, []
    for n, m in experts.items():
        E = m.gate_up_proj.shape[0]
        for proj, rows in (("gate_up", 2), ("down", 1)):
            markers[f"{n}.{proj}_proj"] = torch.arange(len(ids), len(ids) + E * rows,
                                                       dtype=torch.float64).reshape(E, rows, 1)
            ids += [(n, proj, e, h) for e in range(E) for h in range(rows)]
    if not markers:
        return {}, experts
    try:
        out = revert_weight_conversion(model, markers)
    except Exception:  # no per-expert names known: such checkpoints keep the experts fused
        return {}, experts
    names = {}
    for key, t in out.items():
        if key.endswith(".weight") and t.numel() == 1:
            names[key[: -len(".weight")]] = ids[int(t.reshape(-1)[0].item())]
    return names, experts


def _experts_to_v1(name: str, module, layers: dict[tuple, tuple[str, dict]], dtype: torch.dtype) -> tuple[dict, dict]:
    """QuantExperts tensors (``<proj>_qweight`` / ``_scales`` / ``_zeros`` [E, out, in], biases)
    of one fused experts module from its per-expert layers ({(proj, expert, half): (checkpoint
    name, layer)}), and the module's scheme."""
    if getattr(module, "is_transposed", False):
        raise ConvertError(f"hfquant convert: {name} ({type(module).__name__}) keeps its experts transposed ([E, in, "
                           "out]); per-expert checkpoints of it are not supported")
    E = module.gate_up_proj.shape[0]
    shapes = {"gate_up": tuple(module.gate_up_proj.shape[1:]), "down": tuple(module.down_proj.shape[1:])}
    for proj, halves in (("gate_up", 2), ("down", 1)):
        for e in range(E):
            for h in range(halves):
                if (proj, e, h) not in layers:
                    raise ConvertError(f"hfquant convert: {name}: the checkpoint quantizes some experts of the module "
                                       f"but has no quantized {proj.replace('gate_up', 'gate/up')} matrix of expert {e}")
    first = next(iter(layers.values()))[1]
    for ck, L in layers.values():
        if (L["bits"], L["group_size"]) != (first["bits"], first["group_size"]):
            raise ConvertError(f"hfquant convert: {name}: its experts mix schemes ({ck}: {L['bits']}-bit group "
                               f"{L['group_size']}, others {first['bits']}-bit group {first['group_size']}); "
                               "hfquant quantizes a fused experts module with one scheme")
        if _perm_from_g_idx(ck, L["g_idx"], L["K"], L["group_size"]) is not None:
            raise ConvertError(f"hfquant convert: {ck} has an act-order g_idx; hfquant's fused experts have no "
                               "act-order permutation")
    symmetric = all(_is_symmetric(L) for _, L in layers.values())
    out, scheme = {}, None
    for proj, halves in (("gate_up", 2), ("down", 1)):
        per_expert = []
        for e in range(E):
            parts = [_to_v1(layers[(proj, e, h)][0], layers[(proj, e, h)][1], None, dtype, symmetric)
                     for h in range(halves)]
            scheme = parts[0][1]
            per_expert.append({k: torch.cat([t[k] for t, _ in parts]) for k in parts[0][0]})
            n, k = per_expert[-1]["scales"].shape[0], layers[(proj, e, 0)][1]["K"]
            if (n, k) != shapes[proj]:
                raise ConvertError(f"hfquant convert: {name}: expert {e}'s {proj} unpacks to [{n}, {k}] but the "
                                   f"model's is {list(shapes[proj])}")
        for k in per_expert[0]:
            key = f"{proj}_proj_bias" if k == "bias" else f"{proj}_{k}"
            out[key] = torch.stack([t[k] for t in per_expert]).contiguous()
    return out, scheme


def _float_dtype(tensors: dict, quantized: set[str], dtype: str) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ConvertError(f"hfquant convert: dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    floats = [v for k, v in tensors.items() if v.is_floating_point() and k.rsplit(".", 1)[0] not in quantized]
    return max(floats, key=lambda v: v.numel()).dtype if floats else torch.float32


@torch.no_grad()
def convert_checkpoint(src_dir: str, out_dir: str, dtype: str = "auto") -> HfQuantConfig:
    """Converts the GPTQ / AWQ / compressed-tensors checkpoint in ``src_dir`` into an hfquant
    checkpoint in ``out_dir`` (written to a temporary directory and renamed into place).
    ``dtype``: "auto" (the dtype of the checkpoint's float tensors) or float32 / bfloat16 /
    float16 for the scales and every float tensor. Returns the HfQuantConfig written."""
    from ..modeling import is_conv1d

    config = _read_config(src_dir)
    qcfg = config.get("quantization_config") or _side_quant_config(src_dir)
    if not qcfg:
        raise ConvertError(f"hfquant convert: {src_dir}/config.json has no quantization_config (not a quantized "
                           "checkpoint: quantize it with `hfquant quantize` instead)")
    src = _source_scheme(qcfg)
    tensors = _load_tensors(src_dir)
    marker = ".weight_packed" if src["kind"] == "ct" else ".qweight"
    names = sorted(k[: -len(marker)] for k in tensors if k.endswith(marker))
    if not names:
        raise ConvertError(f"hfquant convert: {src_dir} holds no {marker[1:]} tensor; not a {qcfg['quant_method']} "
                           "checkpoint of a known layout")
    quantized = set(names)
    out_dtype = _float_dtype(tensors, quantized, dtype)
    model = _meta_model(config)
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) or is_conv1d(m)]

    state: dict[str, torch.Tensor] = {}
    schemes: dict[str, dict] = {}
    perms: dict[str, torch.Tensor | None] = {}
    in_features: dict[str, int] = {}
    expert_of, fused = _expert_names(model)
    raw = {}
    for name in names:
        prefix = name + "."
        raw[name] = _layer(name, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, src)
    _merge_ct_groups(raw)
    for name, L in raw.items():
        _check_group_size(name, L)
    expert_layers: dict[str, dict] = {}
    for name in [n for n in names if n not in linears and n in expert_of]:
        module_name, proj, e, half = expert_of[name]
        L = raw[name]
        expert_layers.setdefault(module_name, {})[(proj, e, half)] = (name, L)
    for module_name, layers in expert_layers.items():
        t, schemes[module_name] = _experts_to_v1(module_name, fused[module_name], layers, out_dtype)
        state.update({f"{module_name}.{k}": v for k, v in t.items()})
    for name in names:
        if name in expert_of and name not in linears:
            continue
        mod = modules.get(name)
        if mod is None or name not in linears:
            raise ConvertError(f"hfquant convert: {name} is quantized in the checkpoint but is not a linear layer "
                               f"of the model ({config.get('model_type')})")
        prefix = name + "."
        L = raw[name]
        w = mod.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if is_conv1d(mod) else (w.shape[1], w.shape[0])
        if (L["N"], L["K"]) != (out_f, in_f):
            raise ConvertError(f"hfquant convert: {name} unpacks to [{L['N']}, {L['K']}] but the model's layer is "
                               f"[{out_f}, {in_f}]")
        in_features[name] = L["K"]
        perms[name] = _perm_from_g_idx(name, L["g_idx"], L["K"], L["group_size"])
        t, schemes[name] = _to_v1(name, L, perms[name], out_dtype)
        state.update({prefix + k: v for k, v in t.items()})
    act_order = any(p is not None for p in perms.values())
    for name, p in perms.items():
        if act_order and p is None:  # every layer of an act-order model carries a perm
            state[name + ".perm"] = torch.arange(in_features[name], dtype=torch.int32)
    if act_order and expert_layers:
        raise ConvertError("hfquant convert: the checkpoint has act-order layers (g_idx) and MoE experts; hfquant "
                           "reads act-order with method gptq, which does not quantize fused experts")
    for k, v in tensors.items():
        if k.rsplit(".", 1)[0] in quantized:
            continue
        state[k] = v.to(out_dtype) if v.is_floating_point() else v

    # the most common scheme is the config's; the others go to modules_override
    counts: dict[tuple, int] = {}
    for s in schemes.values():
        key = (s["bits"], s["group_size"], s["symmetric"])
        counts[key] = counts.get(key, 0) + 1
    bits, group_size, symmetric = max(counts, key=counts.get)
    override = {n: {k: v for k, v in s.items() if v != {"bits": bits, "group_size": group_size,
                                                        "symmetric": symmetric}[k]}
                for n, s in schemes.items() if (s["bits"], s["group_size"], s["symmetric"]) != (bits, group_size,
                                                                                               symmetric)}
    method = {"gptq": "gptq", "awq": "awq"}.get(src["kind"], "rtn")
    method = "gptq" if act_order else "rtn" if expert_layers else method
    kept_experts = [n for n in fused if n not in expert_layers]
    hq = HfQuantConfig(bits=bits, group_size=group_size, symmetric=symmetric, method=method,
                       modules_to_not_convert=[n for n in linears if n not in quantized] + kept_experts,
                       modules_override=override or None, **({"act_order": act_order} if "act_order" in get_method(method).setting_names() else {}))
    first = next((n for n in linears if n in quantized), None)
    if first is not None:
        state[first + ".weight"] = torch.zeros(0, dtype=torch.uint8)  # the marker of format v1
    new_cfg = dict(config)
    new_cfg["quantization_config"] = hq.to_dict()
    new_cfg["torch_dtype" if "torch_dtype" in new_cfg else "dtype"] = str(out_dtype).removeprefix("torch.")
    with atomic_dir(out_dir) as tmp:
        copy_side_files(src_dir, tmp)
        for stale in ("quantize_config.json", "quant_config.json"):
            if os.path.exists(os.path.join(tmp, stale)):
                os.remove(os.path.join(tmp, stale))
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt", "hfquant_format_version": str(hq.format_version)})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(new_cfg, f, indent=2, sort_keys=True)
    return hq
