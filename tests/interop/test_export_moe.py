"""Export of fused MoE experts (one linear per expert, under the names of the model's original
checkpoints) and of ragged last groups (in_features not a multiple of the group size), on tiny
random models; the compressed-tensors library loads each export to exactly hfquant's weights,
and hfquant's importer reads it back."""
import copy
import importlib
import json
import os
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.interop import ConvertError, ExportError, convert_checkpoint, export_model
from hfquant.nn import QuantExperts, QuantLinear

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, num_experts_per_tok=2, max_position_embeddings=64)
# intermediate 96 at group size 64: the experts' down_proj has a ragged last group
MOE = {"qwen3_moe": ("Qwen3Moe", dict(intermediate_size=128, moe_intermediate_size=96, num_experts=4,
                                      decoder_sparse_step=1)),
       "mixtral": ("Mixtral", dict(intermediate_size=96, num_local_experts=4))}
# per-expert linear names of the original checkpoints: (gate, up, down) of expert e
EXPERT_NAMES = {"qwen3_moe": ("model.layers.0.mlp.experts.{e}.gate_proj", "model.layers.0.mlp.experts.{e}.up_proj",
                              "model.layers.0.mlp.experts.{e}.down_proj"),
                "mixtral": ("model.layers.0.block_sparse_moe.experts.{e}.w1",
                            "model.layers.0.block_sparse_moe.experts.{e}.w3",
                            "model.layers.0.block_sparse_moe.experts.{e}.w2")}



@pytest.fixture(autouse=True)
def _weight_only():
    """Logits are compared with the float layers the formats load, to float rounding: the
    weight-only kernels (int8 activations, the prefill default, also round the activations)."""
    with hfquant.settings(int8_activations_min_m=None):
        yield

def _moe(kind, **cfg):
    prefix, extra = MOE[kind]
    config = getattr(transformers, prefix + "Config")(**COMMON, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, prefix + "ForCausalLM")(config).eval()
    return hfquant.quantize_model(model, hfquant.HfQuantConfig(**{"quantize_embeddings": False, **cfg}))


def _llama(**cfg):
    """hidden 96, intermediate 160 at group size 64: every layer's last group is ragged."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    return hfquant.quantize_model(transformers.LlamaForCausalLM(config).eval(),
                                  hfquant.HfQuantConfig(**{"quantize_embeddings": False, **cfg}))


def _fp16_scales(model):
    """GPTQ stores float16 scales: round ours first, so that the round trip is exact."""
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExperts)):
            m.float()  # drops the kernel layout; the next call repacks
            for k, v in m._buffers.items():
                if k.endswith("scales"):
                    v.data = v.data.half().float()
    return model


def _weights(model) -> dict[str, torch.Tensor]:
    """{name: float weight} of every quantized layer, experts as {module.gate_up / .down: [E, out, in]}."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[n] = m.dequantize_weight()
        elif isinstance(m, QuantExperts):
            out[n + ".gate_up"], out[n + ".down"] = m.dequantize_weight("gate_up"), m.dequantize_weight("down")
    return out


def _ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(_ids()).logits


def _same_logits(back, ours, signed: bool):
    """Bit-identical, except where a layer of ``ours`` holds signed scales: the export writes it
    with zero points (the same weights through the other kernel path), float rounding apart."""
    lb, la = _logits(back), _logits(ours)
    err = (lb - la).abs().max().item()
    print(f"round trip: max |logit diff| {err:.2e} (max |logit| {la.abs().max():.2f})")
    if signed:
        assert err <= 1e-4 * la.abs().max().item()
    else:
        assert err == 0


def _ct_decompress(sd, qcfg, name):
    """One layer of a compressed-tensors export, decompressed by the library's own decompressor
    with the scheme of the config group that targets it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    groups = qcfg["config_groups"]
    group = next((g for g in groups.values() if any(t.startswith("re:") and re.match(t[3:], name)
                                                     for t in g["targets"])), None)
    group = group or next(g for g in groups.values() if name in g["targets"] or "Linear" in g["targets"])
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"], format=group["format"])
    compressor = BaseCompressor.get_value_from_registry(qcfg["format"])
    state = {k: sd[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
             if f"{name}.{k}" in sd}
    return compressor.decompress(state, scheme)["weight"]


def _gptq_dequantize(sd, name, bits):
    """GPTQ v1 dequantization per element: W[n, k] = (code - (zero + 1)) * scale, both of group g_idx[k]."""
    qweight, qzeros, scales, g_idx = (sd[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    K, N, per, mask = g_idx.shape[0], qweight.shape[1], 32 // bits, (1 << bits) - 1
    k, n = torch.arange(K), torch.arange(N)
    codes = ((qweight.to(torch.int64) & 0xFFFFFFFF)[k // per] >> ((k % per) * bits)[:, None]) & mask
    zeros = (((qzeros.to(torch.int64) & 0xFFFFFFFF)[:, n // per] >> ((n % per) * bits)[None, :]) & mask) + 1
    g = g_idx.long()
    return ((codes - zeros[g]).double() * scales.double()[g]).t()


# -- ragged last group --------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(bits=4, group_size=64), dict(bits=4, group_size=64, symmetric=False),
                                 dict(bits=8, group_size=64)], ids=["w4g64", "w4g64a", "w8g64"])
def test_ragged_groups_compressed_tensors(tmp_path, cfg):
    """in_features 96 and 160 at group size 64: the export writes group size 32 (the gcd), each
    group of 64 as two groups of 32 with the same scale and zero point (the ragged last group: one);
    transformers' compressed-tensors loader reads exactly our weights, and the importer merges
    the groups back to 64 (bit-identical logits)."""
    pytest.importorskip("compressed_tensors")
    from transformers import CompressedTensorsConfig

    ours = _llama(**cfg)
    out = str(tmp_path / "ct")
    export_model(ours, out, "compressed-tensors")
    qcfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    (group,) = qcfg["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"]["group_size"] == 32 and group["weights"]["strategy"] == "group"
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert sd["model.layers.0.mlp.down_proj.weight_scale"].shape == (96, 5)  # K 160 = 5 x 32
    theirs = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    mods = dict(theirs.named_modules())
    for n, w in _weights(ours).items():
        assert torch.equal(mods[n].weight, w), n
        assert torch.equal(_ct_decompress(sd, qcfg, n), w), n
    hq = convert_checkpoint(out, str(tmp_path / "back"))
    assert hq.group_size == 64 and not hq.modules_override
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    assert all(m.group_size == 64 for m in back.modules() if isinstance(m, QuantLinear))
    assert _weights(back).keys() == _weights(ours).keys()
    for n, w in _weights(back).items():
        assert torch.equal(w, _weights(ours)[n]), n
    _same_logits(back, ours, signed=cfg.get("symmetric", True))


def test_ragged_groups_gptq(tmp_path):
    """GPTQ holds a ragged last group as is: ceil(K / g) groups, g_idx[k] = k // g."""
    ours = _fp16_scales(_llama(bits=4, group_size=64, symmetric=False))
    out = str(tmp_path / "gptq")
    export_model(ours, out, "gptq")
    sd = load_file(os.path.join(out, "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"  # [96, 160]
    assert sd[name + ".scales"].shape == (3, 96) and sd[name + ".qzeros"].shape == (3, 12)
    assert torch.equal(sd[name + ".g_idx"], torch.arange(160, dtype=torch.int32) // 64)
    for n, w in _weights(ours).items():
        assert torch.equal(_gptq_dequantize(sd, n, 4), w.double()), n
    convert_checkpoint(out, str(tmp_path / "back"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    _same_logits(back, ours, signed=False)


# -- MoE experts ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MOE))
def test_moe_compressed_tensors_export(tmp_path, kind):
    """Symmetric experts on the version 1 grid (no zero points: what transformers' loader reads
    for experts): each expert a linear under the original checkpoint's names, in a config group of
    its own that transformers' loader finds; it loads to exactly our fused experts."""
    pytest.importorskip("compressed_tensors")
    from transformers import CompressedTensorsConfig

    ours = _moe(kind, bits=4, group_size=64, grid="range")
    out = str(tmp_path / "ct")
    export_model(ours, out, "compressed-tensors")
    sd = load_file(os.path.join(out, "model.safetensors"))
    gate, up, down = EXPERT_NAMES[kind]
    for e in range(4):
        for n, shape in ((gate, (96, 64)), (up, (96, 64)), (down, (64, 96))):
            assert sd[n.format(e=e) + ".weight_shape"].tolist() == list(shape)
    assert not any("gate_up" in k or k.endswith("experts.down_proj") for k in sd)
    router = "model.layers.0.block_sparse_moe.gate.weight" if kind == "mixtral" else "model.layers.0.mlp.gate.weight"
    assert router in sd
    qcfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    dense, experts = qcfg["config_groups"]["group_0"], qcfg["config_groups"]["group_1"]
    assert dense["targets"] == ["Linear"] and experts["targets"][0].startswith("re:")
    assert experts["weights"]["group_size"] == 32 and experts["weights"]["symmetric"] is True
    theirs = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    mods = dict(theirs.named_modules())
    for n, w in _weights(ours).items():
        mod, _, proj = n.rpartition(".")
        theirs_w = getattr(mods[mod], proj + "_proj") if proj in ("gate_up", "down") else mods[n].weight
        assert torch.equal(theirs_w, w), n
    la = _logits(ours)
    assert (_logits(theirs) - la).abs().max() <= 1e-4 * la.abs().max()
    hq = convert_checkpoint(out, str(tmp_path / "back"))
    assert hq.method == "rtn" and hq.group_size == 64
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    qe = dict(back.named_modules())["model.layers.0.mlp.experts"]
    assert isinstance(qe, QuantExperts) and qe.group_size == 64 and qe.symmetric
    for n, w in _weights(back).items():
        assert torch.equal(w, _weights(ours)[n]), n
    _same_logits(back, ours, signed=False)


@pytest.mark.parametrize("cfg", [dict(symmetric=False), {}], ids=["asymmetric", "default-grid"])
@pytest.mark.parametrize("kind", list(MOE))
def test_moe_experts_with_zero_points_decompress_exactly(tmp_path, kind, cfg, caplog):
    """Experts written with zero points (asymmetric, or the default grid's signed scales): the
    library's decompressor reads every expert matrix to exactly our weights (transformers' expert
    loader leaves their zero points out, so it is bypassed here, and the export warns so)."""
    pytest.importorskip("compressed_tensors")
    ours = _moe(kind, bits=4, group_size=64, **cfg)
    out = str(tmp_path / "ct")
    export_model(ours, out, "compressed-tensors")
    assert "transformers' compressed-tensors loader does not read the zero points of experts" in caplog.text
    sd = load_file(os.path.join(out, "model.safetensors"))
    qcfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    qe = dict(ours.named_modules())["model.layers.0.mlp.experts"]
    gu, dn = qe.dequantize_weight("gate_up"), qe.dequantize_weight("down")
    gate, up, down = EXPERT_NAMES[kind]
    for e in range(4):
        assert torch.equal(_ct_decompress(sd, qcfg, gate.format(e=e)), gu[e, :96])
        assert torch.equal(_ct_decompress(sd, qcfg, up.format(e=e)), gu[e, 96:])
        assert torch.equal(_ct_decompress(sd, qcfg, down.format(e=e)), dn[e])
    convert_checkpoint(out, str(tmp_path / "back"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    assert not dict(back.named_modules())["model.layers.0.mlp.experts"].symmetric
    _same_logits(back, ours, signed=not cfg)  # the default grid: signed scales


@pytest.mark.parametrize("kind", list(MOE))
def test_moe_gptq_export(tmp_path, kind):
    ours = _fp16_scales(_moe(kind, bits=4, group_size=64))
    out = str(tmp_path / "gptq")
    export_model(ours, out, "gptq")
    sd = load_file(os.path.join(out, "model.safetensors"))
    qe = dict(ours.named_modules())["model.layers.0.mlp.experts"]
    gu, dn = qe.dequantize_weight("gate_up", torch.float64), qe.dequantize_weight("down", torch.float64)
    gate, up, down = EXPERT_NAMES[kind]
    for e in range(4):
        assert sd[down.format(e=e) + ".g_idx"].shape == (96,)  # ragged: groups 64 + 32
        assert torch.equal(_gptq_dequantize(sd, gate.format(e=e), 4), gu[e, :96])
        assert torch.equal(_gptq_dequantize(sd, up.format(e=e), 4), gu[e, 96:])
        assert torch.equal(_gptq_dequantize(sd, down.format(e=e), 4), dn[e])
    convert_checkpoint(out, str(tmp_path / "back"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    for n, w in _weights(back).items():
        assert torch.equal(w, _weights(ours)[n]), n
    _same_logits(back, ours, signed=True)


# -- refusals -------------------------------------------------------------------------------
def test_gpt_oss_experts_are_refused(tmp_path):
    config = transformers.GptOssConfig(**COMMON, intermediate_size=64, num_local_experts=4, sliding_window=8,
                                       layer_types=["full_attention"])
    torch.manual_seed(0)
    ours = hfquant.quantize_model(transformers.GptOssForCausalLM(config).eval(),
                                  hfquant.HfQuantConfig(bits=4, group_size=32))
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(ExportError, match=r"^hfquant export: experts model\.layers\.0\.mlp\.experts \(GptOssExperts\) "
                                              rf"are gpt-oss experts, .*MXFP4 format; {fmt} has no per-expert names"):
            export_model(ours, str(tmp_path / "x"), fmt)
    assert not (tmp_path / "x").exists()


def test_experts_without_per_expert_names_are_refused(tmp_path, monkeypatch):
    """A model class whose conversion mapping does not split its fused experts: no per-expert
    names are known, so the export refuses naming the module."""
    ours = _moe("qwen3_moe", bits=4, group_size=64)
    # the module object the loader's "from .conversion_mapping import ..." reads (the package
    # attribute may be missing when another test has reloaded transformers' lazy modules)
    mapping = importlib.import_module("transformers.conversion_mapping")
    monkeypatch.setattr(mapping, "get_model_conversion_mapping", lambda *a, **k: [])
    with pytest.raises(ExportError, match=r"^hfquant export: experts model\.layers\.0\.mlp\.experts "
                                          r"\(Qwen3MoeExperts\): transformers has no per-expert checkpoint names for "
                                          r"'qwen3_moe' .* so they cannot be exported"):
        export_model(ours, str(tmp_path / "x"), "gptq")
    assert not (tmp_path / "x").exists()


def test_import_refuses_incomplete_or_mixed_experts(tmp_path):
    ours = _moe("qwen3_moe", bits=4, group_size=64)
    out = str(tmp_path / "gptq")
    export_model(_fp16_scales(copy.deepcopy(ours)), out, "gptq")
    path = os.path.join(out, "model.safetensors")
    sd = load_file(path)
    gone = "model.layers.0.mlp.experts.3.up_proj"
    save_file({k: v for k, v in sd.items() if not k.startswith(gone + ".")}, path)
    with pytest.raises(ConvertError, match=r"^hfquant convert: model\.layers\.0\.mlp\.experts: the checkpoint "
                                           r"quantizes some experts of the module but has no quantized gate/up "
                                           r"matrix of expert 3$"):
        convert_checkpoint(out, str(tmp_path / "back"))
    sd["model.layers.0.mlp.experts.1.down_proj.g_idx"] = torch.arange(96, dtype=torch.int32).flip(0) // 64
    save_file(sd, path)
    with pytest.raises(ConvertError, match=r"^hfquant convert: model\.layers\.0\.mlp\.experts\.1\.down_proj has an "
                                           r"act-order g_idx; hfquant's fused experts have no act-order"):
        convert_checkpoint(out, str(tmp_path / "back"))
    assert not (tmp_path / "back").exists()


def test_cli_export_of_a_saved_moe_checkpoint(tmp_path):
    """A checkpoint loaded from disk remembers only the conversions its load used (none split
    experts: hfquant saves them fused); the export still finds the per-expert names."""
    from hfquant.cli import main

    ours = _moe("mixtral", bits=4, group_size=64)
    ours.save_pretrained(tmp_path / "q")
    assert main(["export", str(tmp_path / "q"), str(tmp_path / "gptq"), "--format", "gptq"]) == 0
    sd = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    assert {k for k in sd if ".experts.3." in k} == {f"model.layers.0.block_sparse_moe.experts.3.{p}.{t}"
                                                     for p in ("w1", "w2", "w3")
                                                     for t in ("qweight", "qzeros", "scales", "g_idx")}
    assert main(["convert", str(tmp_path / "gptq"), str(tmp_path / "back")]) == 0
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    qe = dict(back.named_modules())["model.layers.0.mlp.experts"]
    assert torch.equal(qe.dequantize_weight("down"),
                       dict(_fp16_scales(ours).named_modules())["model.layers.0.mlp.experts"].dequantize_weight("down"))
