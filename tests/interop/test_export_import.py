"""Export to GPTQ / compressed-tensors and import (convert) from GPTQ / AWQ /
compressed-tensors, on a slice of the real default model (its first decoder block,
pretrained weights) and real text (WikiText-2)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.cli import main
from hfquant.interop import ConvertError, ExportError, convert_checkpoint, export_model
from hfquant.nn import QuantLinear

LAYERS = 1  # decoder blocks of the slice



@pytest.fixture(autouse=True)
def _weight_only():
    """Logits are compared with the float layers the formats load, to float rounding: the
    weight-only kernels (int8 activations, the prefill default, also round the activations)."""
    with hfquant.settings(int8_activations_min_m=None):
        yield

def _load(model_dir, **cfg):
    """The linear layers quantized (the embedding float unless cfg says: test_embedding_written_dequantized)."""
    cfg = {"quantize_embeddings": False, **cfg}
    return AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=LAYERS,
                                                quantization_config=hfquant.HfQuantConfig(**cfg))


def _fp16_scales(model):
    """GPTQ and AWQ store float16 scales: round ours to float16 first, so that the round trip
    is exact."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.float()  # drops the kernel layout (derived from the scales); the next call repacks
            m.scales.data = m.scales.data.half().float()
    return model


def _quantized(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ids(tokenizer, wikitext):
    return tokenizer(wikitext[:4000], return_tensors="pt").input_ids[:, :128]


def _gptq_dequantize(qweight, qzeros, scales, g_idx, bits):
    """GPTQ v1 dequantization written out per element (AutoGPTQ's reference semantics):
    W[n, k] = (code(k, n) - (zero(g_idx[k], n) + 1)) * scale(g_idx[k], n)."""
    K, N = g_idx.shape[0], qweight.shape[1]
    per = 32 // bits
    mask = (1 << bits) - 1
    k = torch.arange(K)
    q = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = (q[k // per, :] >> ((k % per) * bits)[:, None]) & mask  # [K, N]
    n = torch.arange(N)
    z = qzeros.to(torch.int64) & 0xFFFFFFFF
    zeros = ((z[:, n // per] >> ((n % per) * bits)[None, :]) & mask) + 1  # [G, N]
    g = g_idx.long()
    return ((codes - zeros[g]).double() * scales.double()[g]).t()  # [N, K]


@pytest.mark.parametrize("cfg", [dict(bits=4, group_size=128), dict(bits=4, group_size=64, symmetric=False),
                                 dict(bits=8, group_size=-1)], ids=["w4g128", "w4g64a", "w8c"])
def test_gptq_export_layout_and_round_trip_exact(model_dir, tokenizer, ids, tmp_path, cfg):
    ours = _fp16_scales(_load(model_dir, **cfg))
    out, back_dir = str(tmp_path / "gptq"), str(tmp_path / "back")
    export_model(ours, out, "gptq", source_dir=model_dir)
    qcfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    # symmetric layers with signed scales (the default grid "best") are written with zero points
    signed = any(m.symmetric and (m.scales < 0).any() for m in _quantized(ours).values())
    assert signed == (cfg.get("symmetric", True) and cfg["bits"] == 4)
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == cfg["bits"]
    assert qcfg["group_size"] == cfg["group_size"] and qcfg["sym"] == (cfg.get("symmetric", True) and not signed)
    assert qcfg["desc_act"] is False and qcfg["checkpoint_format"] == "gptq"
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    sd = load_file(os.path.join(out, "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"  # [576, 1536]
    K, N, b = 1536, 576, cfg["bits"]
    G = 1 if cfg["group_size"] == -1 else K // cfg["group_size"]
    assert sd[name + ".qweight"].dtype == torch.int32 and sd[name + ".qweight"].shape == (K * b // 32, N)
    assert sd[name + ".qzeros"].shape == (G, N * b // 32) and sd[name + ".scales"].dtype == torch.float16
    assert sd[name + ".scales"].shape == (G, N) and sd[name + ".g_idx"].shape == (K,)
    assert not any(k.endswith(".qweight") and "lm_head" in k for k in sd)
    for n, m in _quantized(ours).items():  # every layer, ragged groups of the 576-wide inputs included
        w = _gptq_dequantize(sd[n + ".qweight"], sd[n + ".qzeros"], sd[n + ".scales"], sd[n + ".g_idx"], b)
        assert torch.equal(w, m.dequantize_weight(torch.float64)), n

    convert_checkpoint(out, back_dir)
    back = AutoModelForCausalLM.from_pretrained(back_dir)
    assert len(_quantized(back)) == len(_quantized(ours)) == 7 * LAYERS
    for (n, a), b in zip(_quantized(ours).items(), _quantized(back).values()):
        assert torch.equal(a.dequantize_weight(), b.dequantize_weight()), n
    la, lb = _logits(ours, ids), _logits(back, ids)
    if signed:  # the same weights through the zero-point kernel path: float rounding apart
        assert (lb - la).abs().max() <= 1e-4 * la.abs().max()
    else:  # the same tensors: bit-identical
        assert torch.equal(lb, la)


def test_gptq_act_order_round_trip(model_dir, tokenizer, ids, tmp_path):
    """GPTQ with act-order (a real calibration, small): the permutation becomes g_idx and
    comes back as whole groups; every weight is the same, only the order of columns inside
    a group may differ, so the logits agree to the kernels' float rounding."""
    ours = _load(model_dir, bits=4, group_size=128, method="gptq", clip_search=False,
                 calibration={"n_samples": 2, "seq_len": 64})
    _fp16_scales(ours)
    assert any(not torch.equal(m.perm.long(), torch.arange(m.in_features)) for m in _quantized(ours).values())
    out, back_dir = str(tmp_path / "gptq"), str(tmp_path / "back")
    with pytest.raises(ExportError, match="act-order permutation.*no g_idx"):
        export_model(ours, str(tmp_path / "ct"), "compressed-tensors")
    export_model(ours, out, "gptq")
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"]["desc_act"] is True
    convert_checkpoint(out, back_dir)
    back = AutoModelForCausalLM.from_pretrained(back_dir)
    for (n, a), b in zip(_quantized(ours).items(), _quantized(back).values()):
        assert b.perm is not None
        assert torch.equal(a.dequantize_weight(), b.dequantize_weight()), n
    la, lb = _logits(ours, ids), _logits(back, ids)
    ref = _logits(_dequantized(ours), ids)  # the same weights in plain float32 F.linear
    kernel_err = (la - ref).abs().max().item()
    err = (la - lb).abs().max().item()
    print(f"act-order round trip: max |logit diff| {err:.2e}; ours vs float32 F.linear {kernel_err:.2e}")
    assert err <= 2 * kernel_err + 1e-4
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean() >= 0.98


def _dequantized(model):
    import copy

    return copy.deepcopy(model).dequantize()


def _awq_pack(intweight_kn):
    """AutoAWQ's WQLinear_GEMM packing, written as its loop: word c of input row k holds
    output columns 8c + [0, 2, 4, 6, 1, 3, 5, 7] in nibbles 0..7."""
    K, N = intweight_kn.shape
    q = torch.zeros(K, N // 8, dtype=torch.int64)
    for c in range(N // 8):
        for i, col in enumerate([0, 2, 4, 6, 1, 3, 5, 7]):
            q[:, c] |= intweight_kn[:, 8 * c + col].to(torch.int64) << (4 * i)
    return torch.where(q >= 2**31, q - 2**32, q).to(torch.int32)


def test_awq_checkpoint_imports_exactly(model_dir, ids, tmp_path):
    """An AWQ GEMM checkpoint (asymmetric 4-bit g128) built from the layers' codes with
    AutoAWQ's packing loop converts and computes with exactly the same weights."""
    from hfquant.formats.v1 import codes_and_zeros

    ours = _fp16_scales(_load(model_dir, bits=4, group_size=64, symmetric=False))
    src = tmp_path / "awq"
    src.mkdir()
    sd = {k: v for k, v in ours.state_dict().items()
          if not k.endswith((".qweight", ".scales", ".zeros")) and k != "lm_head.weight"}
    for n, m in _quantized(ours).items():
        codes, zeros = codes_and_zeros(m.qweight if not m._packed else m._canonical_qweight(), m.zeros, 4,
                                       m.in_features)
        sd[n + ".qweight"] = _awq_pack(codes.t())
        sd[n + ".qzeros"] = _awq_pack(zeros.t())
        sd[n + ".scales"] = m.scales.t().half().contiguous()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src / "model.safetensors"))
    config = ours.config.to_dict()
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                                     "version": "gemm", "modules_to_not_convert": None}
    json.dump(config, open(src / "config.json", "w"))
    hq = convert_checkpoint(str(src), str(tmp_path / "back"))
    assert hq.method == "awq" and hq.symmetric is False and hq.group_size == 64
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    for (n, a), b in zip(_quantized(ours).items(), _quantized(back).values()):
        assert torch.equal(a.dequantize_weight(), b.dequantize_weight()), n
    assert torch.equal(_logits(back, ids), _logits(ours, ids))


@pytest.mark.parametrize("cfg", [dict(bits=4, group_size=64, symmetric=False), dict(bits=8, group_size=-1), dict()],
                         ids=["w4g64a", "w8c", "default"])
def test_compressed_tensors_export_loads_in_transformers(model_dir, ids, tmp_path, cfg):
    """transformers' compressed-tensors loader (the compressed-tensors library's own
    decompressor) reads the export as exactly our weights; the export converts back to the same
    weights, bit-identical logits where no layer holds signed scales. The default config (W4
    g128, signed scales) has ragged groups (in_features 576): written at group size 64, merged
    back to 128 by the importer."""
    pytest.importorskip("compressed_tensors")
    from transformers import CompressedTensorsConfig

    ours = _load(model_dir, **cfg)
    out = str(tmp_path / "ct")
    export_model(ours, out, "compressed-tensors")
    qcfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    assert qcfg["ignore"] == ["lm_head"]
    (group,) = qcfg["config_groups"].values()
    assert group["weights"]["group_size"] == {"w4g64a": 64, "w8c": None, "default": 64}[_id(cfg)]
    theirs = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    mods = dict(theirs.named_modules())
    for n, m in _quantized(ours).items():
        assert type(mods[n]) is nn.Linear
        assert torch.equal(mods[n].weight, m.dequantize_weight()), n
    la, lt = _logits(ours, ids), _logits(theirs, ids)
    err = (la - lt).abs().max().item()
    print(f"compressed-tensors {cfg}: max |logit diff| vs hfquant {err:.2e} (max |logit| {la.abs().max():.1f})")
    assert err <= 1e-4 * la.abs().max().item() * 10
    hq = convert_checkpoint(out, str(tmp_path / "back"))
    assert (hq.bits, hq.group_size) == ((cfg.get("bits", 4), cfg.get("group_size", 128)))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    for (n, a), b in zip(_quantized(ours).items(), _quantized(back).values()):
        assert torch.equal(a.dequantize_weight(), b.dequantize_weight()), n
    signed = any(m.symmetric and (m.scales < 0).any() for m in _quantized(ours).values())
    assert signed == (_id(cfg) == "default")
    err = (_logits(back, ids) - la).abs().max().item()
    assert err <= 1e-4 * la.abs().max().item() if signed else err == 0


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_embedding_written_dequantized(model_dir, ids, tmp_path, caplog, fmt):
    """The default W4 config quantizes the embedding at 8 bits (the tied lm_head shares it);
    neither format holds a quantized embedding: export writes its dequantized table (said in the
    log), lm_head among the float layers, and the export loads back with that table as its
    embedding and head: the same logits up to the head's float matmul."""
    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    ours = AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=LAYERS,
                                                quantization_config=hfquant.HfQuantConfig(bits=4, group_size=128))
    emb = ours.model.embed_tokens
    assert type(emb).__name__ == "QuantEmbedding" and emb.bits == 8 and type(ours.lm_head).__name__ == "TiedQuantLinear"
    if fmt == "gptq":
        _fp16_scales(ours)
    out = str(tmp_path / "x")
    with caplog.at_level("WARNING", logger="hfquant"):
        qcfg = export_model(ours, out, fmt)
    assert "model.embed_tokens (a 8-bit quantized embedding) is written dequantized" in caplog.text
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert torch.equal(sd["model.embed_tokens.weight"], emb.dequantize_weight())
    assert not any(k.startswith("model.embed_tokens.") and k != "model.embed_tokens.weight" for k in sd)
    if fmt == "gptq":
        back = AutoModelForCausalLM.from_pretrained(convert_checkpoint(out, str(tmp_path / "back")) and
                                                    str(tmp_path / "back"))
        assert isinstance(back.model.embed_tokens, nn.Embedding)
        assert torch.equal(back.model.embed_tokens.weight, emb.dequantize_weight())
        torch.testing.assert_close(back.lm_head.weight, emb.dequantize_weight())
        la, lb = _logits(ours, ids), _logits(back, ids)
        assert (la - lb).abs().max() <= 1e-3 * la.abs().max()
    else:
        assert "lm_head" in qcfg["ignore"]


def _id(cfg):
    return {4: "w4g64a", 8: "w8c"}.get(cfg.get("bits"), "default")


def test_export_refuses_what_a_format_cannot_hold(model_dir, tmp_path):
    lin = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    llm_int8 = hfquant.quantize_model(lin, hfquant.HfQuantConfig(method="llm_int8", fold_norms=False))
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(ExportError, match=r"method 'llm_int8'.*hfquant format v1"):
            export_model(llm_int8, str(tmp_path / "x"), fmt)
    km = hfquant.quantize_model(nn.Sequential(nn.Linear(64, 64)), hfquant.HfQuantConfig(method="kmeans", bits=4))
    with pytest.raises(ExportError, match=r"method 'kmeans'.*codebooks.*hfquant format v1"):
        export_model(km, str(tmp_path / "x"), "gptq")
    with pytest.raises(ExportError, match="unknown format 'exl2'"):
        export_model(llm_int8, str(tmp_path / "x"), "exl2")
    # online rotations are not carried by either format; offline-only rotated models export
    rotated = _load(model_dir, bits=4, group_size=128, rotation="hadamard")
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(ExportError, match=r"layer model.layers.0.mlp.down_proj rotates its input online .* "
                                              r"rotation_online=\[\] \(offline rotations only"):
            export_model(rotated, str(tmp_path / "x"), fmt)
    assert not (tmp_path / "x").exists()
    offline = _load(model_dir, bits=4, group_size=128, symmetric=True, grid="range", rotation="hadamard",
                    rotation_online=[])
    export_model(offline, str(tmp_path / "offline"), "gptq")
    assert (tmp_path / "offline" / "config.json").exists()


def test_cli_export_and_convert(model_dir, tmp_path, capsys):
    q, out, back = str(tmp_path / "q"), str(tmp_path / "gptq"), str(tmp_path / "back")
    _load(model_dir, bits=4, group_size=64, method="rtn").save_pretrained(q)
    assert main(["export", q, out, "--format", "gptq"]) == 0
    assert main(["convert", out, back]) == 0
    assert json.load(open(os.path.join(back, "config.json")))["quantization_config"]["quant_method"] == "hfquant"
    assert main(["convert", back, str(tmp_path / "again")]) == 2
    assert "hfquant's own format already" in capsys.readouterr().err
    assert main(["convert", model_dir, str(tmp_path / "float")]) == 2
    assert "no quantization_config" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "float")


def test_convert_rejects_bad_checkpoints(model_dir, tmp_path):
    ours = _load(model_dir, bits=4, group_size=64)
    out = str(tmp_path / "gptq")
    export_model(ours, out, "gptq")
    sd = load_file(os.path.join(out, "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    # a g_idx whose groups are not whole: no permutation into groups of 64 exists
    sd[name + ".g_idx"] = torch.cat([torch.zeros(65, dtype=torch.int32), torch.arange(1, 9, dtype=torch.int32)
                                     .repeat_interleave(64)[:511]])
    save_file(sd, os.path.join(out, "model.safetensors"))
    with pytest.raises(ConvertError, match=f"{name}.g_idx does not give every group 64 columns"):
        convert_checkpoint(out, str(tmp_path / "back"))
    del sd[name + ".qzeros"]
    save_file(sd, os.path.join(out, "model.safetensors"))
    with pytest.raises(ConvertError, match=f"no tensor {name}.qzeros"):
        convert_checkpoint(out, str(tmp_path / "back"))
    assert not (tmp_path / "back").exists()
