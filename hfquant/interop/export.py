"""Export of an hfquant model to the checkpoint layouts serving engines read: GPTQ
(AutoGPTQ / GPTQModel, ``checkpoint_format`` "gptq") and compressed-tensors
``pack-quantized`` (docs/formats.md, "Export and import").

Only weight-only integer layers (QuantLinear: rtn, gptq, awq) and fused MoE experts
(QuantExperts, written as one linear per expert under the names of the model's original
checkpoints) have a place in these formats; the codes and scales are moved, never
requantized, so the exported weight is the one hfquant computes with (GPTQ stores scales in
float16: one rounding of each scale when the model is float32 or bfloat16).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re

import torch
from safetensors.torch import save_file

from ..formats.v1 import codes_and_zeros
from ..methods import get_method, method_names
from ..modeling import input_rotation
from ..nn import PackedLinear, QuantEmbedding, QuantExperts, QuantLinear, TiedQuantLinear
from ..nn.experts import PROJS
from . import layouts
from ..fileio import atomic_dir, copy_side_files

FORMATS = ("gptq", "compressed-tensors")


class ExportError(ValueError):
    pass

logger = logging.getLogger("hfquant")


def _method_of(model) -> str:
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    method = getattr(cfg, "method", None) or (cfg.get("method") if isinstance(cfg, dict) else None)
    return method or "rtn"


def _layer_method(m, model):
    """The method class of a layer: the model's configured method where its layers are of this
    type, else the first method whose layers are."""
    configured = _method_of(model)
    if configured in method_names() and type(m) is get_method(configured).layer_class:
        return get_method(configured)
    return next((get_method(n) for n in method_names() if type(m) is get_method(n).layer_class), None)


def _check_exportable(model, fmt: str) -> list[tuple[str, QuantLinear]]:
    if fmt not in FORMATS:
        raise ExportError(f"hfquant export: unknown format {fmt!r} (use one of {', '.join(FORMATS)})")
    layers = []
    for name, m in model.named_modules():
        if input_rotation(m) is not None:
            raise ExportError(f"hfquant export: layer {name} rotates its input online (rotation_online="
                              f"['down_proj'], its weight holds the inverse), which the {fmt} format does not "
                              f"carry: its loaders would run the layer without the transform. Quantize with "
                              f"rotation_online=[] (offline rotations only, which export as plain weights) to export")
        if isinstance(m, PackedLinear) and not isinstance(m, QuantLinear):
            method = _layer_method(m, model)
            what = method.why_not_exportable if method is not None else type(m).__name__
            raise ExportError(
                f"hfquant export: method {method.name if method else '?'!r} ({what}; layer {name}) cannot be "
                f"expressed in the {fmt} "
                f"format. Formats that can hold it: hfquant format v1 (save_pretrained) only; {', '.join(FORMATS)} "
                "hold weight-only integer methods (rtn, gptq, awq; 4- or 8-bit)")
        elif isinstance(m, (QuantEmbedding, TiedQuantLinear)):
            continue  # written in float (_float_state): the formats hold no quantized embedding
        elif isinstance(m, QuantExperts):
            if m.bits not in (4, 8):
                raise ExportError(f"hfquant export: experts {name} have {m.bits}-bit weights; export writes 4- and "
                                  "8-bit layers only")
        elif type(m).__module__.startswith("hfquant.nn") and type(m) is not QuantLinear:
            raise ExportError(f"hfquant export: layer {name} ({type(m).__name__}) has no {fmt} layout; "
                              "only weight-only QuantLinear layers can be exported")
        if isinstance(m, QuantLinear):
            if m.bits not in (4, 8):
                raise ExportError(f"hfquant export: layer {name} has {m.bits}-bit weights; export writes 4- and "
                                  "8-bit layers only")
            if m.zero_point != "integer":
                raise ExportError(f"hfquant export: layer {name} has float offsets (zero_point='float'), which {fmt} "
                                  f"cannot hold (its zero points are integers); export a model quantized with "
                                  f"zero_point='integer'")
            layers.append((name, m))
    if not layers and not any(isinstance(m, QuantExperts) for m in model.modules()):
        raise ExportError("hfquant export: the model has no quantized layer (load an hfquant checkpoint, or "
                          "quantize first)")
    return layers


def _signed(m: QuantLinear) -> bool:
    """Whether a symmetric layer holds negative scales (grid "extreme" / "best")."""
    return m.symmetric and bool((m.scales < 0).any())


def _symmetric(m: QuantLinear) -> bool:
    """Whether the export stores the layer without zero points: a layer with signed scales is
    written with zero points (below)."""
    return m.symmetric and not _signed(m)


def _unsigned_codes(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K] in 0..2^bits - 1, zero points [N, G] (int64) and scales [N, G] >= 0, stored
    column order. A group with a negative scale s (signed grids) is the same weight with codes
    2^b - 1 - c, zero point 2^(b-1) - 1 and scale -s: (c - h) s = ((2^b - 1 - c) - (h - 1)) (-s)."""
    q = m._canonical_qweight()
    codes, zeros = codes_and_zeros(q, m.zeros, m.bits, m.in_features)
    codes, zeros = codes.to(torch.int64), zeros.to(torch.int64)
    if m.bits == 8 and m.symmetric:  # values -127..127 around zero 0 -> codes around 128
        codes, zeros = codes + 128, zeros + 128
    G = m.scales.shape[1]
    zeros = zeros.expand(-1, G).contiguous()
    scales = m.scales.detach()
    if _signed(m):
        neg = scales < 0
        K, g = m.in_features, m.in_features if m.group_size == -1 else m.group_size
        col_neg = neg[:, torch.arange(K, device=neg.device) // g]
        codes = torch.where(col_neg, (1 << m.bits) - 1 - codes, codes)
        zeros = torch.where(neg, (1 << m.bits) - 1 - zeros, zeros)
        scales = scales.abs()
    return codes, zeros, scales


def _unpermute(m: QuantLinear, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in input column order, and the group of each input column (g_idx)."""
    K = m.in_features
    g = K if m.group_size == -1 else m.group_size
    stored_group = torch.arange(K, dtype=torch.int64) // g
    if m.perm is None:
        return codes, stored_group.to(torch.int32)
    perm = m.perm.long().cpu()
    out = torch.empty_like(codes)
    out[:, perm] = codes
    g_idx = torch.empty(K, dtype=torch.int64)
    g_idx[perm] = stored_group
    return out, g_idx.to(torch.int32)


def _is_identity(m: QuantLinear) -> bool:
    return m.perm is None or torch.equal(m.perm.long().cpu(), torch.arange(m.in_features))


def _gptq_tensors(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    K, N = m.in_features, m.out_features
    P = 32 // m.bits
    if K % P or N % P:
        raise ExportError(f"hfquant export: {name} is [{N}, {K}]; GPTQ packs {P} codes to an int32 along both "
                          f"in_features (qweight) and out_features (qzeros), so both must be multiples of {P}")
    codes, zeros, scales = _unsigned_codes(m)
    codes, g_idx = _unpermute(m, codes.cpu())
    try:
        qzeros = layouts.gptq_pack_qzeros(zeros.cpu(), m.bits)
    except ValueError as e:
        raise ExportError(f"hfquant export: {name}: {e}; a group with zero point 0 (all weights >= 0) of an "
                          "asymmetric scheme has no GPTQ v1 encoding; export to compressed-tensors instead") from None
    s16 = scales.cpu().to(torch.float16)
    if not torch.isfinite(s16).all():
        raise ExportError(f"hfquant export: {name}.scales overflow float16, the dtype of GPTQ scales")
    out = {"qweight": layouts.gptq_pack_qweight(codes, m.bits), "qzeros": qzeros,
           "scales": s16.t().contiguous(), "g_idx": g_idx}
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu()
    return out


def _ct_plan(layers, experts: set[str]) -> dict[str, tuple[bool, int, int, bool]]:
    """(is an expert, bits, group_size, symmetric) each layer is written with: one scheme per
    hfquant (bits, group_size), the experts' apart from the dense layers'. compressed-tensors
    groups must divide in_features; where one does not (a ragged last group), the scheme's group
    size becomes the gcd of it and every in_features of its layers, each group then being a whole
    number of the smaller groups (repeated scales and zero points: the same weights). Symmetric
    only when every layer of the scheme is."""
    members: dict[tuple[bool, int, int], list] = {}
    for name, m in layers:
        members.setdefault((name in experts, m.bits, m.group_size), []).append((name, m))
    plan = {}
    for (is_expert, bits, g), ms in members.items():
        g_out = g
        if g != -1:
            for _, m in ms:
                g_out = math.gcd(g_out, m.in_features)
        sym = all(_symmetric(m) for _, m in ms)
        plan.update({name: (is_expert, bits, g_out, sym) for name, _ in ms})
    return plan


def _expert_targets(names: list[str]) -> list[str]:
    """The targets of a config group of per-expert linears: one regex over their names (the
    form transformers' loader looks for to tell the experts' scheme from the dense layers'), or
    the names themselves where they do not read <...>.experts.<i>.<proj>."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    pattern = r".*\.experts\.\d+\.(?:" + "|".join(re.escape(x) for x in leaves) + ")$"
    return [f"re:{pattern}"] if all(re.fullmatch(pattern, n) for n in names) else names


def _ct_tensors(name: str, m: QuantLinear, g_out: int, sym: bool) -> dict[str, torch.Tensor]:
    K, N = m.in_features, m.out_features
    if not _is_identity(m):
        raise ExportError(f"hfquant export: {name} has an act-order permutation (GPTQ act_order=True); "
                          "compressed-tensors pack-quantized stores groups of consecutive input columns and has no "
                          "g_idx, so it cannot hold it: export to gptq (which stores g_idx), or quantize with "
                          "act_order=False")
    codes, zeros, scales = _unsigned_codes(m)
    if g_out != m.group_size:  # each group of group_size written as group_size / g_out groups (the last: fewer)
        idx = torch.arange(K // g_out, device=scales.device) * g_out // m.group_size
        zeros, scales = zeros[:, idx], scales[:, idx]
    out = {"weight_packed": layouts.ct_pack(codes.cpu(), m.bits),
           "weight_scale": scales.cpu().contiguous(),
           "weight_shape": torch.tensor([N, K], dtype=torch.int64)}
    if not sym:
        out["weight_zero_point"] = layouts.ct_pack(zeros.cpu().t().contiguous(), m.bits).t().contiguous()
    elif not torch.equal(zeros, torch.full_like(zeros, 1 << (m.bits - 1))):
        raise ExportError(f"hfquant export: {name} is symmetric but its zero points are not {1 << (m.bits - 1)}")
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu()
    return out


def _gptq_config(layers, kept: list[str]) -> dict:
    schemes = {(m.bits, m.group_size) for _, m in layers}
    if len(schemes) != 1:
        raise ExportError(f"hfquant export: GPTQ holds one bits/group_size for the whole model; this one mixes "
                          f"{sorted(schemes)} (modules_override): export to compressed-tensors instead")
    bits, group_size = schemes.pop()
    sym = all(_symmetric(m) for _, m in layers)
    desc_act = not all(_is_identity(m) for _, m in layers)
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
            "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
            "checkpoint_format": "gptq", "modules_to_not_convert": kept}


def _ct_config(plan: dict[str, tuple[bool, int, int, bool]], kept: list[str]) -> dict:
    import importlib.metadata as md

    by_scheme: dict[tuple, list[str]] = {}
    for name, scheme in plan.items():
        by_scheme.setdefault(scheme, []).append(name)
    dense_schemes = sum(1 for is_expert, *_ in by_scheme if not is_expert)
    groups = {}
    for i, ((is_expert, bits, g, sym), names) in enumerate(sorted(by_scheme.items())):
        groups[f"group_{i}"] = {
            "targets": _expert_targets(names) if is_expert else ["Linear"] if dense_schemes == 1 else names,
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym,
                        "strategy": "channel" if g == -1 else "group", "group_size": None if g == -1 else g,
                        "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
                        "block_structure": None},
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }
    try:
        version = md.version("compressed-tensors")
    except md.PackageNotFoundError:
        version = "0.20.0"
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": kept, "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}, "version": version}


def _kept_linears(model, layers) -> list[str]:
    """The linear layers written in float (the format's ignore list): float nn.Linear, and output
    heads sharing a quantized embedding, which are written with its dequantized table."""
    quantized = {n for n, _ in layers}
    return [n for n, m in model.named_modules()
            if (isinstance(m, torch.nn.Linear) or isinstance(m, TiedQuantLinear)) and n not in quantized]


def _revert_names(model, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``state`` under the names of the model's original checkpoints: the conversion mapping of
    the model's class reverted, as save_pretrained writes a model built from its config (a model
    loaded from an hfquant checkpoint remembers only the conversions that load used)."""
    from transformers.core_model_loading import revert_weight_conversion

    had = "_weight_conversions" in model.__dict__
    used = model.__dict__.get("_weight_conversions")
    model.__dict__["_weight_conversions"] = None
    try:
        return dict(revert_weight_conversion(model, dict(state)))
    except Exception as e:  # a mapping that cannot run on these tensors
        raise ExportError(f"hfquant export: the checkpoint names of {what} could not be derived from transformers' "
                          f"conversion mapping of {model.config.model_type!r} ({type(e).__name__}: {e})") from None
    finally:
        if had:
            model.__dict__["_weight_conversions"] = used
        else:
            del model.__dict__["_weight_conversions"]


def _checkpoint_names(model, linears: list[str], experts: list[tuple[str, QuantExperts]], fmt: str):
    """The name the model's original checkpoints give each quantized linear ({model name:
    checkpoint name}), and the per-expert linears of each fused experts module ({module: [(checkpoint
    name, proj, expert, half)]}, half 0 / 1 the gate / up rows of gate_up): transformers'
    conversion mapping reverted on marker tensors whose values are their own ids."""
    model_type = getattr(model.config, "model_type", "")
    markers, ids = {}, []

    def mark(shape, *key):
        t = torch.arange(len(ids), len(ids) + math.prod(shape), dtype=torch.float64).reshape(shape)
        for idx in range(math.prod(shape)):
            e, rest = divmod(idx, math.prod(shape[1:]))
            ids.append((*key, e, rest))
        return t

    for n in linears:
        markers[n + ".weight"] = mark((1, 1), "linear", n)
    for n, m in experts:
        if "gpt_oss" in model_type or m.source_class.startswith("GptOss"):
            raise ExportError(f"hfquant export: experts {n} ({m.source_class or model_type}) are gpt-oss experts, whose "
                              f"checkpoints keep them fused in gpt-oss' own MXFP4 format; {fmt} has no per-expert "
                              "names for them: save them in hfquant format v1 (save_pretrained)")
        if m.transposed:
            raise ExportError(f"hfquant export: experts {n} ({m.source_class}) are held transposed ([E, in, out]); "
                              f"{fmt} has no per-expert names for them: save them in hfquant format v1 "
                              "(save_pretrained)")
        markers[n + ".gate_up_proj"] = mark((m.num_experts, 2, 1), "gate_up", n)
        markers[n + ".down_proj"] = mark((m.num_experts, 1, 1), "down", n)
    out = _revert_names(model, markers, "the quantized layers")
    names: dict[str, str] = {}
    parts: dict[str, list] = {n: [] for n, _ in experts}
    for key, t in out.items():
        kind, n, e, half = ids[int(t.reshape(-1)[0].item())]
        if kind != "linear" and not key.endswith(".weight"):
            raise ExportError(f"hfquant export: experts {n} ({dict(experts)[n].source_class}): transformers has no "
                              f"per-expert checkpoint names for {model_type!r} (its conversion mapping does not split "
                              f"{key.rsplit('.', 1)[-1]}); {fmt} stores one linear per expert, so they cannot be "
                              "exported: save them in hfquant format v1 (save_pretrained)")
        if t.numel() != 1 or not key.endswith(".weight"):
            raise ExportError(f"hfquant export: transformers' conversion mapping of {model_type!r} changes {n} into "
                              f"{key} {tuple(t.shape)}, which is not one linear layer")
        if kind == "linear":
            names[n] = key[: -len(".weight")]
        else:
            parts[n].append((key[: -len(".weight")], kind, e, half))
    for n, m in experts:
        if len(parts[n]) != 3 * m.num_experts:
            raise ExportError(f"hfquant export: transformers' conversion mapping of {model_type!r} gives experts {n} "
                              f"{len(parts[n])} per-expert linears; expected {3 * m.num_experts} (gate, up and down "
                              "of each expert)")
    missing = [n for n in linears if n not in names]
    if missing:
        raise ExportError(f"hfquant export: transformers' conversion mapping of {model_type!r} merges {missing[0]} "
                          "with other tensors; its checkpoint name is unknown")
    return names, parts


def _expert_layers(m: QuantExperts, parts: list) -> list[tuple[str, QuantLinear]]:
    """One QuantLinear per expert matrix (gate_up split into its gate and up rows), holding the
    module's tensors as they are."""
    tensors = {p: (m._canonical_qweight(p).detach().cpu(), getattr(m, f"{p}_scales").detach().cpu(),
                   getattr(m, f"{p}_zeros", None), getattr(m, f"{p}_proj_bias")) for p in PROJS}
    out = []
    for ckpt, proj, e, half in sorted(parts):
        q, s, z, b = tensors[proj]
        n, k = m.proj_shape(proj)
        rows = n // 2 if proj == "gate_up" else n
        r = slice(half * rows, (half + 1) * rows)
        lay = QuantLinear(k, rows, False, m.bits, m.group_size, m.symmetric, dtype=s.dtype, device="meta",
                          grid=m.grid)
        lay.load_quantized(q[e, r], s[e, r], None if z is None else z[e, r].detach().cpu())
        if b is not None:
            lay.bias = torch.nn.Parameter(b[e, r].detach().cpu(), requires_grad=False)
        out.append((ckpt, lay))
    return out


def _float_state(model, quantized: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the model except the quantized modules', tied copies dropped; a quantized
    embedding as its dequantized table (``weight`` in its float dtype; an untied output head
    sharing it gets a copy), said once in the log."""
    embeds = {n: m for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    prefixes = tuple(n + "." for n in [*quantized, *embeds])
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for n, m in embeds.items():
        sd[n + ".weight"] = m.dequantize_weight().to(m.scales.dtype)
        logger.warning("hfquant export: %s (a %d-bit quantized embedding) is written dequantized to %s: the format "
                       "holds no quantized embedding", n, m.bits, m.scales.dtype)
    tie = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for n, m in model.named_modules():
        if isinstance(m, TiedQuantLinear) and not tie:
            sd[n + ".weight"] = m.source.dequantize_weight().to(m.source.scales.dtype).clone()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in dict(tied).items():
        if target in sd and source in sd and sd[target].data_ptr() == sd[source].data_ptr():
            del sd[target]
    sd = _revert_names(model, {k: v.detach().cpu() for k, v in sd.items()}, "the float tensors")
    return {k: v.contiguous() for k, v in sd.items()}


@torch.no_grad()
def export_model(model, out_dir: str, fmt: str, source_dir: str | None = None) -> dict:
    """Writes ``model`` (an hfquant-quantized transformers model) to ``out_dir`` in format
    ``fmt`` ("gptq" or "compressed-tensors"): model.safetensors and config.json with the
    format's quantization_config; tokenizer and generation files are copied from
    ``source_dir`` when given. Written to a temporary directory and renamed into place.
    Returns the quantization_config written."""
    layers = _check_exportable(model, fmt)
    if not hasattr(getattr(model, "config", None), "to_dict"):
        raise ExportError("hfquant export: the model must be a transformers model (it needs its config)")
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantExperts)]
    kept = _kept_linears(model, layers)
    names, parts = _checkpoint_names(model, [n for n, _ in layers], experts, fmt)
    state = _float_state(model, [n for n, _ in layers] + [n for n, _ in experts])
    layers = [(names[n], m) for n, m in layers] + [x for n, m in experts for x in _expert_layers(m, parts[n])]
    plan = _ct_plan(layers, {p[0] for ps in parts.values() for p in ps}) if fmt == "compressed-tensors" else {}
    for name, m in layers:
        t = _gptq_tensors(name, m) if fmt == "gptq" else _ct_tensors(name, m, *plan[name][2:])
        for k, v in t.items():
            state[f"{name}.{k}"] = v.contiguous()
    qcfg = _gptq_config(layers, kept) if fmt == "gptq" else _ct_config(plan, kept)
    if fmt == "compressed-tensors" and any(is_expert and not sym for is_expert, _, _, sym in plan.values()):
        logger.warning("hfquant export: the MoE experts are written with zero points (an asymmetric scheme, or the "
                       "signed scales of grid 'best' / 'extreme'); transformers' compressed-tensors loader does not "
                       "read the zero points of experts, the compressed-tensors library does. For experts it loads, "
                       "quantize with symmetric=True, grid='range'")
    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    with atomic_dir(out_dir) as tmp:
        if source_dir:
            copy_side_files(source_dir, tmp)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return qcfg
