"""Checks of a quantized checkpoint against the model its config builds, before any
tensor is read: safetensors only, no tensor missing, none unexpected, float tensors of
the right shape and kind. The quantized tensors' own shapes, dtypes and values are
checked after loading, by each layer's ``validate`` (formats/v1.py, formats/lut.py).

Only the safetensors headers are read (``safe_open``); nothing is unpickled.
"""
from __future__ import annotations

import os
import re

import torch
from safetensors import safe_open

from .nn import PackedLinear, QuantExperts

# safetensors dtype names -> torch dtypes (the ones torch can hold)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
# transformers drops these buffers from old checkpoints without a word
_ALWAYS_IGNORED = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$")


def check_safetensors_only(files) -> None:
    """Raises unless every checkpoint file is a .safetensors file."""
    for f in files or ():
        if not str(f).endswith(".safetensors"):
            raise ValueError(
                f"hfquant: {os.path.basename(str(f))} is not a safetensors file; quantized checkpoints are "
                "loaded from safetensors only (pickle-based files can run code when loaded)"
            )


def read_header(files) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """{tensor name: (shape, dtype)} over every file, from the safetensors headers only."""
    out = {}
    for f in files or ():
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                out[k] = (tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype()))
    return out


def _regex(patterns) -> re.Pattern | None:
    patterns = [p for p in patterns if p]
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def _renames_keys(model) -> bool:
    """Whether transformers renames or fuses this model's checkpoint keys while loading
    (then names in the file differ from the model's)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    types = {getattr(getattr(m, "config", None), "model_type", None) for m in model.modules()
             if hasattr(m, "config")}
    return any(t and get_checkpoint_conversion_mapping(t) for t in types)


def check_keys(model, files) -> None:
    """Compares the tensors named in the checkpoint files with the ones the model (already
    holding its empty quantized layers) expects; raises ValueError naming the first
    missing or unexpected tensor, or a float tensor of the wrong shape or kind."""
    if not files or _renames_keys(model):
        return
    header = read_header(files)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
    header, cross = _align_prefix(model, header, expected)
    # saved from another class (a causal LM's checkpoint under a classification head, say)
    saved_as = getattr(getattr(model, "config", None), "architectures", None) or ()
    cross = cross or bool(saved_as and type(model).__name__ not in saved_as)
    found = len(set(header) & set(expected))
    if found < len(expected) // 2:
        tied = set(dict(getattr(model, "all_tied_weights_keys", None) or {}))
        example = sorted(set(expected) - set(header) - tied or set(expected) - set(header))[0]
        raise ValueError(
            f"hfquant: the checkpoint's tensor names do not match the model built from its config: {found} of "
            f"{len(expected)} expected tensors found (the model expects {example}; the file has "
            f"{min(set(header) - set(expected), default='no other tensor')}); a checkpoint of another architecture or layout")
    tied = set(dict(getattr(model, "all_tied_weights_keys", None) or {}))
    ignore_missing = _regex(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    ignore_unexpected = _regex([*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
                                *_ALWAYS_IGNORED])
    quantized = tuple(n + "." for n, m in model.named_modules() if isinstance(m, (PackedLinear, QuantExperts)))

    missing = sorted(k for k in expected if not (k in header or k in tied
                                                 or (ignore_missing and ignore_missing.search(k))
                                                 # a task head over a base model's checkpoint: transformers
                                                 # initialises the float head (and says so); quantized
                                                 # layers must come from the file
                                                 or (cross and not k.startswith(quantized))))
    if missing:
        raise ValueError(f"hfquant: the checkpoint has no tensor {missing[0]}{_more(missing)} (missing from the "
                         "safetensors files, or a truncated or mismatched checkpoint)")
    unexpected = sorted(k for k in header if not (k in expected or (ignore_unexpected and ignore_unexpected.search(k))))
    if unexpected:
        raise ValueError(f"hfquant: the checkpoint has an unexpected tensor {unexpected[0]}{_more(unexpected)}: the "
                         "model built from its quantization_config has no such tensor (config and tensors do not "
                         "match)")
    for key, (shape, dtype) in header.items():
        if key not in expected or key.startswith(quantized):
            continue  # the quantized layers validate their tensors after loading, by name
        want_shape, want_dtype = expected[key]
        if shape != want_shape:
            raise ValueError(f"hfquant: the checkpoint's {key} has shape {shape}, expected {want_shape}")
        if want_dtype.is_floating_point and not (dtype is not None and dtype.is_floating_point):
            raise ValueError(f"hfquant: the checkpoint's {key} has dtype {dtype}, expected floating point")


def _align_prefix(model, header: dict, expected: dict) -> tuple[dict, bool]:
    """The header's names as the model spells them, where one of the two carries the base
    model prefix (``model.``) and the other does not: a base model's checkpoint loaded into a
    task model, or the reverse (transformers maps the names the same way). Returns (header,
    whether the checkpoint is of another class than the model)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return header, False
    lead = prefix + "."
    in_header = any(k.startswith(lead) for k in header)
    in_model = any(k.startswith(lead) for k in expected)
    if in_model and not in_header:
        aligned = {lead + k: v for k, v in header.items()}
    elif in_header and not in_model:
        aligned = {k[len(lead):]: v for k, v in header.items() if k.startswith(lead)}
    else:
        return header, False
    if len(set(aligned) & set(expected)) <= len(set(header) & set(expected)):
        return header, False  # not a prefix matter: the names differ otherwise
    return aligned, True


def _more(keys) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
