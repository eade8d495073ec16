"""Export of an hfquant model to the checkpoint layouts serving engines read: GPTQ
(AutoGPTQ / GPTQModel, ``checkpoint_format`` "gptq") and compressed-tensors
``pack-quantized`` (docs/formats.md, "Export and import").

Only weight-only integer layers (QuantLinear: rtn, gptq, awq) have a place in these
formats; the codes and scales are moved, never requantized, so the exported weight is the
one hfquant computes with (GPTQ stores scales in float16: one rounding of each scale when
the model is float32 or bfloat16).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..formats.v1 import codes_and_zeros
from ..methods import get_method, method_names
from ..nn import PackedLinear, QuantLinear
from . import layouts
from ..fileio import atomic_dir, copy_side_files

FORMATS = ("gptq", "compressed-tensors")


class ExportError(ValueError):
    pass


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
        if isinstance(m, PackedLinear) and not isinstance(m, QuantLinear):
            method = _layer_method(m, model)
            what = method.why_not_exportable if method is not None else type(m).__name__
            raise ExportError(
                f"hfquant export: method {method.name if method else '?'!r} ({what}; layer {name}) cannot be "
                f"expressed in the {fmt} "
                f"format. Formats that can hold it: hfquant format v1 (save_pretrained) only; {', '.join(FORMATS)} "
                "hold weight-only integer methods (rtn, gptq, awq; 4- or 8-bit)")
        elif type(m).__module__.startswith("hfquant.nn") and type(m) is not QuantLinear:
            raise ExportError(f"hfquant export: layer {name} ({type(m).__name__}) has no {fmt} layout; "
                              "only weight-only QuantLinear layers can be exported")
        if isinstance(m, QuantLinear):
            if m.bits not in (4, 8):
                raise ExportError(f"hfquant export: layer {name} has {m.bits}-bit weights; export writes 4- and "
                                  "8-bit layers only")
            layers.append((name, m))
    if not layers:
        raise ExportError("hfquant export: the model has no quantized layer (load an hfquant checkpoint, or "
                          "quantize first)")
    return layers


def _unsigned_codes(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [N, K] in 0..2^bits - 1 and zero points [N, G] (int64), stored column order."""
    q = m._canonical_qweight()
    codes, zeros = codes_and_zeros(q, m.zeros, m.bits, m.in_features)
    codes, zeros = codes.to(torch.int64), zeros.to(torch.int64)
    if m.bits == 8 and m.symmetric:  # values -127..127 around zero 0 -> codes around 128
        codes, zeros = codes + 128, zeros + 128
    G = m.scales.shape[1]
    return codes, zeros.expand(-1, G).contiguous()


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
    codes, zeros = _unsigned_codes(m)
    codes, g_idx = _unpermute(m, codes.cpu())
    try:
        qzeros = layouts.gptq_pack_qzeros(zeros.cpu(), m.bits)
    except ValueError as e:
        raise ExportError(f"hfquant export: {name}: {e}; a group with zero point 0 (all weights >= 0) of an "
                          "asymmetric scheme has no GPTQ v1 encoding; export to compressed-tensors instead") from None
    scales = m.scales.detach().cpu()
    s16 = scales.to(torch.float16)
    if not torch.isfinite(s16).all():
        raise ExportError(f"hfquant export: {name}.scales overflow float16, the dtype of GPTQ scales")
    out = {"qweight": layouts.gptq_pack_qweight(codes, m.bits), "qzeros": qzeros,
           "scales": s16.t().contiguous(), "g_idx": g_idx}
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu()
    return out


def _ct_tensors(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    K, N = m.in_features, m.out_features
    if not _is_identity(m):
        raise ExportError(f"hfquant export: {name} has an act-order permutation (GPTQ act_order=True); "
                          "compressed-tensors pack-quantized stores groups of consecutive input columns and has no "
                          "g_idx, so it cannot hold it: export to gptq (which stores g_idx), or quantize with "
                          "act_order=False")
    if m.group_size != -1 and K % m.group_size:
        raise ExportError(f"hfquant export: {name} has in_features {K}, not a multiple of group_size "
                          f"{m.group_size}; compressed-tensors needs whole groups")
    codes, zeros = _unsigned_codes(m)
    out = {"weight_packed": layouts.ct_pack(codes.cpu(), m.bits),
           "weight_scale": m.scales.detach().cpu().contiguous(),
           "weight_shape": torch.tensor([N, K], dtype=torch.int64)}
    if not m.symmetric:
        out["weight_zero_point"] = layouts.ct_pack(zeros.cpu().t().contiguous(), m.bits).t().contiguous()
    elif not torch.equal(zeros, torch.full_like(zeros, 1 << (m.bits - 1))):
        raise ExportError(f"hfquant export: {name} is symmetric but its zero points are not {1 << (m.bits - 1)}")
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu()
    return out


def _scheme(m: QuantLinear) -> tuple[int, int, bool]:
    return m.bits, m.group_size, m.symmetric


def _gptq_config(layers, kept: list[str]) -> dict:
    schemes = {(m.bits, m.group_size) for _, m in layers}
    if len(schemes) != 1:
        raise ExportError(f"hfquant export: GPTQ holds one bits/group_size for the whole model; this one mixes "
                          f"{sorted(schemes)} (modules_override): export to compressed-tensors instead")
    bits, group_size = schemes.pop()
    sym = all(m.symmetric for _, m in layers)
    desc_act = not all(_is_identity(m) for _, m in layers)
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
            "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
            "checkpoint_format": "gptq", "modules_to_not_convert": kept}


def _ct_config(layers, kept: list[str]) -> dict:
    import importlib.metadata as md

    by_scheme: dict[tuple, list[str]] = {}
    for name, m in layers:
        by_scheme.setdefault(_scheme(m), []).append(name)
    groups = {}
    for i, ((bits, g, sym), names) in enumerate(sorted(by_scheme.items())):
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(by_scheme) == 1 else names,
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
    quantized = {n for n, _ in layers}
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]


def _float_state(model, layers) -> dict[str, torch.Tensor]:
    """Every tensor of the model except the quantized layers', tied copies dropped."""
    prefixes = tuple(n + "." for n, _ in layers)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in dict(tied).items():
        if target in sd and source in sd and sd[target].data_ptr() == sd[source].data_ptr():
            del sd[target]
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


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
    kept = _kept_linears(model, layers)
    state = _float_state(model, layers)
    make = _gptq_tensors if fmt == "gptq" else _ct_tensors
    for name, m in layers:
        for k, v in make(name, m).items():
            state[f"{name}.{k}"] = v.contiguous()
    qcfg = _gptq_config(layers, kept) if fmt == "gptq" else _ct_config(layers, kept)
    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    with atomic_dir(out_dir) as tmp:
        if source_dir:
            copy_side_files(source_dir, tmp)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return qcfg
