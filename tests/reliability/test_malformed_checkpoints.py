"""Malformed quantized checkpoints: every row breaks one real checkpoint (a slice of the
default model saved by hfquant, see conftest.py) in one way and names the exact error
loading it must raise. Nothing may load silently wrong, crash, or reach pickle."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import hfquant
from ckpt_tools import edit_config, read_tensors

L0 = "model.layers.0"
L1 = "model.layers.1"
IDS = torch.tensor([[1, 504, 3458, 282, 4144, 314, 253, 1789, 28, 284, 3122]]) % 1024


# --- mutations: each takes the checkpoint directory and breaks it in place --------------------
def tensors(fn):
    """Rewrites model.safetensors after fn(state_dict) edited it."""
    def mutate(path):
        f = os.path.join(path, "model.safetensors")
        sd = read_tensors(f)
        fn(sd)
        save_file(sd, f, metadata={"format": "pt"})
    return mutate


def config(**changes):
    return lambda path: edit_config(path, **changes)


def set_item(key, index, value):
    def fn(sd):
        sd[key][index] = value
    return fn


def replace(key, make):
    def fn(sd):
        sd[key] = make(sd[key])
    return fn


def pop(key):
    return lambda sd: sd.pop(key)


def add(key, tensor):
    return lambda sd: sd.__setitem__(key, tensor)


def truncate(fraction):
    def mutate(path):
        f = os.path.join(path, "model.safetensors")
        with open(f, "r+b") as fh:
            fh.truncate(int(os.path.getsize(f) * fraction))
    return mutate


def overwrite_bytes(offset, data):
    def mutate(path):
        with open(os.path.join(path, "model.safetensors"), "r+b") as fh:
            fh.seek(offset)
            fh.write(data)
    return mutate


def edit_header(fn):
    """Rewrites the JSON header of model.safetensors (fn edits the parsed dict), data unchanged."""
    def mutate(path):
        f = os.path.join(path, "model.safetensors")
        raw = Path(f).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        fn(header)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        Path(f).write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    return mutate


def remove_file(name):
    return lambda path: os.remove(os.path.join(path, name))


def write_file(name, text):
    return lambda path: Path(path, name).write_text(text)


def _first_shard_with(path, key):
    index = json.loads(Path(path, "model.safetensors.index.json").read_text())
    return index["weight_map"][key]


def remove_shard_holding(key):
    return lambda path: os.remove(os.path.join(path, _first_shard_with(path, key)))


def _negate_one(t):
    t = t.clone()
    t[3, -1] = -t[3, -1].abs() - 1e-3
    return t


def _dup_perm(p):
    p = p.clone()
    p[5] = p[6]
    return p


# --- the table: (id, checkpoint, mutation, exception type, message fragment (regex)) --------
def _n(name):
    return re.escape(name)


ROWS = [
    # missing / extra tensors
    ("missing_qweight", "w4g128", tensors(pop(f"{L0}.self_attn.q_proj.qweight")), ValueError,
     rf"checkpoint has no tensor {_n(L0)}\.self_attn\.q_proj\.qweight"),
    ("missing_scales", "w8", tensors(pop(f"{L1}.mlp.down_proj.scales")), ValueError,
     rf"checkpoint has no tensor {_n(L1)}\.mlp\.down_proj\.scales"),
    ("missing_zeros", "w4g128a", tensors(pop(f"{L0}.mlp.up_proj.zeros")), ValueError,
     rf"checkpoint has no tensor {_n(L0)}\.mlp\.up_proj\.zeros"),
    ("missing_codebook", "kmeans", tensors(pop(f"{L1}.self_attn.v_proj.codebook")), ValueError,
     rf"checkpoint has no tensor {_n(L1)}\.self_attn\.v_proj\.codebook"),
    ("missing_perm", "gptq", tensors(pop(f"{L0}.mlp.gate_proj.perm")), ValueError,
     rf"checkpoint has no tensor {_n(L0)}\.mlp\.gate_proj\.perm"),
    ("missing_norm", "w4g128", tensors(pop("model.norm.weight")), ValueError,
     r"checkpoint has no tensor model\.norm\.weight"),
    ("missing_embedding", "llm_int8", tensors(pop("model.embed_tokens.weight")), ValueError,
     r"checkpoint has no tensor model\.embed_tokens\.weight"),
    ("extra_zeros_symmetric", "w4g128", tensors(add(f"{L0}.self_attn.o_proj.zeros",
                                                    torch.full((576, 5), 8, dtype=torch.uint8))), ValueError,
     rf"unexpected tensor {_n(L0)}\.self_attn\.o_proj\.zeros"),
    ("extra_perm", "w4g128", tensors(add(f"{L1}.mlp.down_proj.perm", torch.arange(1536, dtype=torch.int32))),
     ValueError, rf"unexpected tensor {_n(L1)}\.mlp\.down_proj\.perm"),
    ("extra_float_weight", "w8", tensors(add(f"{L1}.self_attn.k_proj.weight", torch.zeros(192, 576))), ValueError,
     rf"unexpected tensor {_n(L1)}\.self_attn\.k_proj\.weight"),
    ("extra_scales_in_kmeans", "kmeans", tensors(add(f"{L0}.mlp.up_proj.scales", torch.ones(1536, 1))), ValueError,
     rf"unexpected tensor {_n(L0)}\.mlp\.up_proj\.scales"),
    # wrong shape
    ("qweight_shape", "w4g128", tensors(replace(f"{L1}.mlp.up_proj.qweight", lambda t: t[:, :100].contiguous())),
     ValueError, rf"{_n(L1)}\.mlp\.up_proj\.qweight has shape \(1536, 100\)"),
    ("qweight_transposed", "w8", tensors(replace(f"{L0}.mlp.down_proj.qweight", lambda t: t.t().contiguous())),
     ValueError, rf"{_n(L0)}\.mlp\.down_proj\.qweight has shape \(1536, 576\)"),
    ("scales_shape", "w4g128", tensors(replace(f"{L0}.self_attn.k_proj.scales", lambda t: t[:, :4].contiguous())),
     ValueError, rf"{_n(L0)}\.self_attn\.k_proj\.scales has shape \(192, 4\)"),
    ("zeros_shape", "w4g128a", tensors(replace(f"{L0}.self_attn.q_proj.zeros", lambda t: t[:100].contiguous())),
     ValueError, rf"{_n(L0)}\.self_attn\.q_proj\.zeros has shape \(100, 5\)"),
    ("codebook_shape", "kmeans", tensors(replace(f"{L0}.self_attn.q_proj.codebook", lambda t: t[..., :8].contiguous())),
     ValueError, rf"{_n(L0)}\.self_attn\.q_proj\.codebook has shape \(576, 1, 8\)"),
    ("perm_shape", "gptq", tensors(replace(f"{L1}.self_attn.o_proj.perm", lambda t: t[:-1].contiguous())),
     ValueError, rf"{_n(L1)}\.self_attn\.o_proj\.perm has shape \(575,\)"),
    ("norm_shape", "w4g128", tensors(replace(f"{L0}.input_layernorm.weight", lambda t: t[:500].contiguous())),
     ValueError, rf"checkpoint's {_n(L0)}\.input_layernorm\.weight has shape \(500,\), expected \(576,\)"),
    # wrong dtype
    ("qweight_dtype_int16", "w8", tensors(replace(f"{L1}.mlp.up_proj.qweight", lambda t: t.to(torch.int16))),
     ValueError, rf"{_n(L1)}\.mlp\.up_proj\.qweight has shape \(1536, 576\) and dtype torch\.int16"),
    ("qweight_int8_for_4bit", "w4g128", tensors(replace(f"{L0}.mlp.gate_proj.qweight", lambda t: t.view(torch.int8))),
     ValueError, rf"{_n(L0)}\.mlp\.gate_proj\.qweight has shape \(1536, 288\) and dtype torch\.int8"),
    ("scales_int", "w4g128", tensors(replace(f"{L1}.self_attn.v_proj.scales", lambda t: t.to(torch.int32))),
     ValueError, rf"{_n(L1)}\.self_attn\.v_proj\.scales has shape \(192, 5\) and dtype torch\.int32"),
    ("zeros_int32", "w4g128a", tensors(replace(f"{L1}.mlp.gate_proj.zeros", lambda t: t.to(torch.int32))),
     ValueError, rf"{_n(L1)}\.mlp\.gate_proj\.zeros has shape \(1536, 5\) and dtype torch\.int32"),
    ("codebook_int", "kmeans", tensors(replace(f"{L1}.mlp.down_proj.codebook", lambda t: t.to(torch.int16))),
     ValueError, rf"{_n(L1)}\.mlp\.down_proj\.codebook has shape \(576, 1, 16\) and dtype torch\.int16"),
    ("perm_int64", "gptq", tensors(replace(f"{L0}.self_attn.v_proj.perm", lambda t: t.to(torch.int64))),
     ValueError, rf"{_n(L0)}\.self_attn\.v_proj\.perm has shape \(576,\) and dtype torch\.int64"),
    ("norm_int", "w8", tensors(replace("model.norm.weight", lambda t: t.to(torch.int32))), ValueError,
     r"checkpoint's model\.norm\.weight has dtype torch\.int32, expected floating point"),
    # values out of range
    ("zero_point_17", "w4g128a", tensors(set_item(f"{L0}.mlp.down_proj.zeros", (7, 2), 17)), ValueError,
     rf"{_n(L0)}\.mlp\.down_proj\.zeros holds values above 15"),
    ("negative_scale", "w4g128", tensors(replace(f"{L1}.mlp.gate_proj.scales", _negate_one)), ValueError,
     rf"{_n(L1)}\.mlp\.gate_proj\.scales contains negative values"),
    ("negative_scale_int8", "llm_int8", tensors(replace(f"{L0}.self_attn.q_proj.scales", _negate_one)), ValueError,
     rf"{_n(L0)}\.self_attn\.q_proj\.scales contains negative values"),
    ("nan_scale", "w8", tensors(set_item(f"{L0}.mlp.gate_proj.scales", (100, 0), float("nan"))), ValueError,
     rf"{_n(L0)}\.mlp\.gate_proj\.scales contains NaN or Inf"),
    ("inf_scale", "w4g128a", tensors(set_item(f"{L1}.self_attn.o_proj.scales", (0, 4), float("inf"))), ValueError,
     rf"{_n(L1)}\.self_attn\.o_proj\.scales contains NaN or Inf"),
    ("int8_minus_128", "llm_int8", tensors(set_item(f"{L1}.mlp.up_proj.qweight", (9, 9), -128)), ValueError,
     rf"{_n(L1)}\.mlp\.up_proj\.qweight holds -128"),
    ("codebook_nan", "kmeans", tensors(set_item(f"{L0}.mlp.gate_proj.codebook", (3, 0, 2), float("nan"))), ValueError,
     rf"{_n(L0)}\.mlp\.gate_proj\.codebook contains NaN or Inf"),
    ("perm_duplicate", "gptq", tensors(replace(f"{L1}.mlp.up_proj.perm", _dup_perm)), ValueError,
     rf"{_n(L1)}\.mlp\.up_proj\.perm is not a permutation of 0\.\.575"),
    ("perm_out_of_range", "gptq", tensors(set_item(f"{L0}.self_attn.k_proj.perm", 0, 1 << 30)), ValueError,
     rf"{_n(L0)}\.self_attn\.k_proj\.perm is not a permutation"),
    ("perm_negative", "gptq", tensors(set_item(f"{L0}.mlp.down_proj.perm", 4, -1)), ValueError,
     rf"{_n(L0)}\.mlp\.down_proj\.perm is not a permutation"),
    # the file itself
    ("truncated_data", "w4g128", truncate(0.5), SafetensorError, r"(?i)incomplete|invalid|size"),
    ("truncated_header", "w4g128", truncate(0.0001), SafetensorError, r"(?i)header|incomplete|invalid"),
    ("empty_file", "w8", truncate(0), SafetensorError, r"(?i)header|incomplete|invalid"),
    ("header_length_huge", "w4g128", overwrite_bytes(0, struct.pack("<Q", 1 << 62)), SafetensorError,
     r"(?i)header.*(too large|invalid)|too large"),
    ("header_not_json", "kmeans", overwrite_bytes(8, b"\xff\xfe not json"), SafetensorError, r"(?i)header|json|utf"),
    ("header_offsets_past_end", "w8", edit_header(lambda h: h[f"{L0}.mlp.up_proj.qweight"].update(
        data_offsets=[0, 1 << 40])), SafetensorError, r"(?i)invalid|offset|bound|size"),
    ("header_overlapping_offsets", "w8", edit_header(lambda h: h[f"{L1}.mlp.up_proj.scales"].update(
        data_offsets=h[f"{L1}.mlp.down_proj.scales"]["data_offsets"])), SafetensorError, r"(?i)invalid|offset"),
    ("header_dtype_lies", "w4g128", edit_header(lambda h: h[f"{L0}.mlp.up_proj.scales"].update(dtype="I32")),
     ValueError, rf"{_n(L0)}\.mlp\.up_proj\.scales has shape \(1536, 5\) and dtype torch\.int32"),
    ("header_unknown_dtype", "w4g128", edit_header(lambda h: h[f"{L0}.mlp.up_proj.scales"].update(dtype="Q99")),
     SafetensorError, r"(?i)dtype|variant|deserializ"),
    ("config_not_json", "w8", write_file("config.json", "{not json"), OSError, r"(?i)config\.json|json"),
    ("weights_missing", "w8", remove_file("model.safetensors"), OSError, r"no file named model\.safetensors"),
    # the config
    ("unknown_method", "w4g128", config(method="awq2"), ValueError, r"method='awq2' is not supported"),
    ("unknown_format_version", "w8", config(format_version=4), ValueError,
     r"format_version=4 is not supported by this hfquant"),
    ("bits_5", "w4g128", config(bits=5), ValueError, r"bits=5 is not supported"),
    # 3 bits is a valid setting, but the 4-bit tensors do not fit its bit-stream layout
    ("bits_3", "w4g128", config(bits=3), ValueError,
     r"qweight has shape \(\d+, \d+\) and dtype torch\.uint8; expected \(\d+, \d+\) torch\.uint8 for bits=3"),
    ("bits_string", "w8", config(bits="8"), ValueError, r"HfQuantConfig: bits must be an int, got '8' \(str\)"),
    ("group_size_100", "w4g128", config(group_size=100), ValueError, r"group_size=100 is not supported"),
    ("unknown_key", "w4g128", config(bogus_option=1), ValueError, r"unknown argument\(s\) \['bogus_option'\]"),
    ("bits_changed_8", "w4g128", config(bits=8), ValueError,
     rf"{_n(L0)}\.self_attn\.q_proj\.qweight has shape \(576, 288\) and dtype torch\.uint8; expected \(576, 576\)"),
    ("group_size_changed", "w4g128", config(group_size=64), ValueError,
     rf"{_n(L0)}\.self_attn\.q_proj\.scales has shape \(576, 5\)"),
    ("symmetric_flipped", "w4g128", config(symmetric=False), ValueError,
     rf"checkpoint has no tensor {_n(L0)}\.mlp\.down_proj\.zeros \(and 13 more\)"),
    ("asymmetric_flipped", "w4g128a", config(symmetric=True), ValueError,
     rf"unexpected tensor {_n(L0)}\.mlp\.down_proj\.zeros \(and 13 more\)"),
    ("override_unknown_module", "w4g128", config(modules_override={"model.layers.7.mlp.down_proj": {"bits": 8}}),
     ValueError, r"modules_override names 'model\.layers\.7\.mlp\.down_proj', but the model has no module"),
    ("override_bad_setting", "w4g128", config(modules_override={"down_proj": {"bitz": 8}}), ValueError,
     r"modules_override\['down_proj'\] must be a dict with keys among bits, group_size, symmetric"),
    ("override_mismatch", "w4g128", config(modules_override={f"{L1}.mlp.down_proj": {"bits": 8}}), ValueError,
     rf"{_n(L1)}\.mlp\.down_proj\.qweight has shape \(576, 768\) and dtype torch\.uint8; expected \(576, 1536\)"),
    ("skip_list_changed", "w4g128", config(modules_to_not_convert=["lm_head", "down_proj"]), ValueError,
     rf"checkpoint has no tensor {_n(L0)}\.mlp\.down_proj\.weight \(and 1 more\)"),
    ("method_kmeans_on_rtn", "w4g128", config(method="kmeans", group_size=-1), ValueError,
     rf"checkpoint has no tensor {_n(L0)}\.mlp\.down_proj\.codebook \(and 13 more\)"),
    # sharded checkpoints
    ("missing_shard", "sharded", remove_shard_holding(f"{L1}.mlp.down_proj.qweight"), OSError,
     r"(?i)model-0000\d-of-00005\.safetensors"),
    ("index_names_absent_key", "sharded", lambda p: _index_drop(p, f"{L0}.mlp.up_proj.scales"), ValueError,
     rf"checkpoint has no tensor {_n(L0)}\.mlp\.up_proj\.scales"),
    ("index_not_json", "sharded", write_file("model.safetensors.index.json", "{"), ValueError, r"(?i)json|expecting"),
]


def _index_drop(path, key):
    """The index forgets a tensor (so its shard is read without it)."""
    f = Path(path, "model.safetensors.index.json")
    index = json.loads(f.read_text())
    shard = index["weight_map"].pop(key)
    f.write_text(json.dumps(index))
    # and the shard no longer holds it either
    sd = read_tensors(os.path.join(path, shard))
    sd.pop(key)
    save_file(sd, os.path.join(path, shard), metadata={"format": "pt"})


@pytest.mark.parametrize("base,mutate,exc,match", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_malformed_checkpoint_raises_exact_error(checkpoints, tmp_path, base, mutate, exc, match):
    bad = shutil.copytree(checkpoints[base], tmp_path / "ckpt")
    mutate(str(bad))
    with pytest.raises(exc, match=match):
        AutoModelForCausalLM.from_pretrained(bad)


def test_table_covers_every_scheme():
    assert {r[1] for r in ROWS} == {"w4g128", "w4g128a", "w8", "kmeans", "llm_int8", "gptq", "sharded"}
    assert len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("base", ["w4g128", "w4g128a", "w8", "kmeans", "llm_int8", "gptq", "sharded"])
def test_intact_checkpoints_load_and_agree(checkpoints, slice_dir, base):
    """The control of the table: each unbroken checkpoint loads and computes what the
    quantized model computes (gptq: the reordered columns undo to the w4g128 weights)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoints[base])
    with torch.no_grad():
        logits = model(IDS).logits
    ref_dir = checkpoints["w4g128" if base in ("gptq", "sharded") else base]
    ref = AutoModelForCausalLM.from_pretrained(ref_dir)
    with torch.no_grad():
        # (gptq: the same products summed in another column order)
        torch.testing.assert_close(logits, ref(IDS).logits, rtol=0, atol=0 if base != "gptq" else 1e-3)
    fp = AutoModelForCausalLM.from_pretrained(slice_dir)
    with torch.no_grad():
        f = fp(IDS).logits
    # and it is close to the float slice it came from (not garbage that agrees with itself)
    assert torch.nn.functional.cosine_similarity(logits.flatten(), f.flatten(), dim=0) > 0.95


# --- no pickle anywhere ---------------------------------------------------------------------
PACKAGE = Path(hfquant.__file__).parent


def test_package_source_never_unpickles():
    pattern = re.compile(r"torch\.load\b|import (pickle|dill|joblib)|from (pickle|dill|joblib)|pickle\.|"
                         r"weights_only\s*=\s*False|numpy\.load|np\.load")
    hits = [f"{p.relative_to(PACKAGE.parent)}:{i + 1}: {line.strip()}"
            for p in sorted(PACKAGE.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert hits == []


def test_loading_never_calls_torch_load_or_pickle(checkpoints, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    for base in ("w4g128", "kmeans", "llm_int8", "gptq", "sharded"):
        model = AutoModelForCausalLM.from_pretrained(checkpoints[base])
        with torch.no_grad():
            assert torch.isfinite(model(IDS).logits).all()


def test_pickle_checkpoint_is_refused(checkpoints, tmp_path, monkeypatch):
    """A directory holding only pytorch_model.bin (a pickle) is not loaded through torch.load."""
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    bad = shutil.copytree(checkpoints["w8"], tmp_path / "bin")
    sd = read_tensors(str(bad / "model.safetensors"))
    os.remove(bad / "model.safetensors")
    real_save = torch.save
    real_save(sd, bad / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"hfquant: .*pytorch_model\.bin.*safetensors"):
        AutoModelForCausalLM.from_pretrained(bad)
    assert calls == []
