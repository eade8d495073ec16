"""Format version 2's grids: the symmetric "extreme" (GGUF Q4_0's placement, signed scales) and
"best" (per group the smaller squared error) grids and the asymmetric float offset (GGUF Q4_1's
grid); what they store, the format version a config says, save/reload, and what refuses them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hfquant
from hfquant import formats
from hfquant.formats.v1 import grouped
from hfquant.interop.export import ExportError, export_model


def _w(N=64, K=256, seed=0):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


def _err(q, w, bits=4, gs=32):
    d = formats.dequantize(q.qweight, q.scales, q.zeros, bits, gs, w.shape[1], torch.float32, offsets=q.offsets)
    return (grouped(d - w, gs) ** 2).sum(-1)  # [N, G]


def test_extreme_grid_puts_the_extreme_on_the_lowest_code():
    w = _w()
    q = formats.quantize_rtn(w, 4, 32, True, grid="extreme")
    codes = formats.unpack_int4(q.qweight, w.shape[1]).reshape(64, 8, 32).long()
    g = grouped(w, 32)
    at = g.abs().argmax(-1, keepdim=True)
    assert (codes.gather(-1, at) == 0).all()  # value -8
    ext = g.gather(-1, at).squeeze(-1)
    assert torch.equal(q.scales, ext / -8)
    assert ((q.scales < 0) == (ext > 0)).all()


def test_best_grid_is_the_better_of_range_and_extreme_per_group():
    w = _w(seed=1)
    e = {grid: _err(formats.quantize_rtn(w, 4, 32, True, grid=grid), w) for grid in formats.GRIDS}
    assert torch.equal(e["best"], torch.minimum(e["range"], e["extreme"]))
    assert e["best"].sum() < e["range"].sum() and e["best"].sum() < e["extreme"].sum()


def test_extreme_grid_agrees_with_gguf_q4_0():
    """GGUF's reference quantizer (fp16 scales, blocks of 32) and the extreme grid with fp16 scales:
    the same dequantized weights but where a weight sits on a rounding tie."""
    from gguf import GGMLQuantizationType, quants

    w = _w(32, 256, seed=2)
    t = GGMLQuantizationType.Q4_0
    theirs = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), t), t).reshape(32, 256).copy())
    q = formats.quantize_rtn(w, 4, 32, True, scale_dtype=torch.float16, grid="extreme")
    ours = formats.dequantize(q.qweight, q.scales, None, 4, 32, 256, torch.float32)
    same = torch.isclose(ours, theirs, rtol=0, atol=1e-6).float().mean().item()
    assert same > 0.995, same


def test_float_offset_reproduces_a_q4_1_grid_exactly():
    gen = torch.Generator().manual_seed(3)
    s = torch.rand(16, 8, generator=gen) * 0.1 + 0.01
    m = -torch.rand(16, 8, generator=gen)
    c = torch.randint(0, 16, (16, 8, 32), generator=gen).float()
    c[..., 0], c[..., 1] = 0, 15  # each block spans its whole grid
    w = (c * s[..., None] + m[..., None]).reshape(16, 256)
    q = formats.quantize_rtn(w, 4, 32, False, zero_point="float")
    assert q.zeros is None and q.offsets.shape == (16, 8)
    d = formats.dequantize(q.qweight, q.scales, None, 4, 32, 256, torch.float32, offsets=q.offsets)
    torch.testing.assert_close(d, w, rtol=0, atol=5e-7)  # float32 rounding of (max - min) / 15
    # the integer zero point cannot: 0 is always on its grid
    qi = formats.quantize_rtn(w, 4, 32, False)
    assert (_err(qi, w) > 1e-6).any()


@pytest.mark.parametrize("gs", [32, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_float_offset_round_trip_and_ragged_groups(bits, gs):
    w = _w(17, 300, seed=4)
    q = formats.quantize_rtn(w, bits, gs, False, zero_point="float")
    d = formats.dequantize(q.qweight, q.scales, None, bits, gs, 300, torch.float32, offsets=q.offsets)
    assert torch.equal(d, formats.fake_quantize(w, bits, gs, False, zero_point="float"))
    # every weight within half a step of its group's grid, the ragged last group included
    g = 300 if gs == -1 else gs
    step = q.scales.repeat_interleave(g, dim=1)[:, :300]
    assert ((d - w).abs() <= step / 2 + 1e-6).all()
    formats.validate("layer", q.qweight, q.scales, None, bits, gs, 300, 17, False, offsets=q.offsets)


def test_validate_grids():
    w = _w()
    q = formats.quantize_rtn(w, 4, 32, True, grid="best")
    assert (q.scales < 0).any()
    with pytest.raises(ValueError, match=r"hfquant: layer.scales contains negative values"):
        formats.validate("layer", q.qweight, q.scales, None, 4, 32, 256, 64, True)
    formats.validate("layer", q.qweight, q.scales, None, 4, 32, 256, 64, True, signed_scales=True)
    qf = formats.quantize_rtn(w, 4, 32, False, zero_point="float")
    with pytest.raises(ValueError, match=r"layer.zeros is missing \(asymmetric scheme with integer zero points\)"):
        formats.validate("layer", qf.qweight, qf.scales, None, 4, 32, 256, 64, False)
    with pytest.raises(ValueError, match=r"layer.offsets has shape \(64, 4\) and dtype torch.float32; expected "
                                         r"\(64, 8\) torch.float32"):
        formats.validate("layer", qf.qweight, qf.scales, None, 4, 32, 256, 64, False, offsets=qf.offsets[:, :4])
    bad = qf.offsets.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer.offsets contains NaN or Inf"):
        formats.validate("layer", qf.qweight, qf.scales, None, 4, 32, 256, 64, False, offsets=bad)
    with pytest.raises(ValueError, match="layer.offsets is present but the scheme has no zero point"):
        formats.validate("layer", qf.qweight, qf.scales, None, 4, 32, 256, 64, True, offsets=qf.offsets)
    with pytest.raises(ValueError, match=r"grid='wide' is not supported"):
        formats.quantize_rtn(w, 4, 32, True, grid="wide")
    with pytest.raises(ValueError, match=r"zero_point='half' is not supported"):
        formats.quantize_rtn(w, 4, 32, False, zero_point="half")


def test_config_format_version_and_errors():
    # the default grid ("best") is version 2; the range grid, asymmetric integer zero points and
    # the other methods stay version 1
    c = hfquant.HfQuantConfig(bits=4)
    assert c.grid == "best" and c.format_version == 2 and c.to_dict()["format_version"] == 2
    assert hfquant.HfQuantConfig(bits=4, grid="range").to_dict()["format_version"] == 1
    assert hfquant.HfQuantConfig(bits=4, symmetric=False).to_dict()["format_version"] == 1
    assert hfquant.HfQuantConfig(method="gptq").to_dict()["format_version"] == 1
    assert hfquant.HfQuantConfig(format_version=1).grid == "range"  # what version 1 held
    c = hfquant.HfQuantConfig(bits=4, symmetric=False, zero_point="float")
    assert c.to_dict()["format_version"] == 2 and c.to_dict()["zero_point"] == "float"
    with pytest.raises(ValueError, match=r"format_version=1 cannot hold this scheme .* it needs format_version 2"):
        hfquant.HfQuantConfig(bits=4, grid="extreme", format_version=1)
    with pytest.raises(ValueError, match=r"format_version=4 is not supported by this hfquant \(it reads "
                                         r"format_version 1 to 3\); upgrade hfquant"):
        hfquant.HfQuantConfig(bits=4, format_version=4)
    # a version 1 config does not name the settings version 1 did not have
    assert "grid" not in hfquant.HfQuantConfig(bits=8).to_dict()  # the grid does not apply at 8 bits
    assert "zero_point" not in hfquant.HfQuantConfig(bits=4, symmetric=False).to_dict()
    over = hfquant.HfQuantConfig(bits=4, symmetric=False, modules_override={"q_proj": {"symmetric": True}})
    assert over.format_version == 2  # an override's symmetric scheme takes the grid
    with pytest.raises(ValueError, match=r"zero_point='float' applies to asymmetric schemes; set symmetric=False"):
        hfquant.HfQuantConfig(bits=4, zero_point="float")
    with pytest.raises(ValueError, match=r"grid='wide' is not supported \(use one of \('range', 'extreme', 'best'\)\)"):
        hfquant.HfQuantConfig(bits=4, grid="wide")
    with pytest.raises(ValueError, match=r"grid applies to methods \('rtn'"):
        hfquant.HfQuantConfig(bits=4, method="gptq", grid="best")
    # an older checkpoint's config (no grid, format 1) reads as the version 1 grids
    old = hfquant.HfQuantConfig.from_dict({"quant_method": "hfquant", "format_version": 1, "method": "rtn",
                                           "bits": 4, "group_size": 128, "symmetric": True})
    assert (old.grid, old.zero_point, old.format_version) == ("range", "integer", 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.mark.parametrize("kw", [dict(grid="extreme"), dict(grid="best"), dict(symmetric=False, zero_point="float"),
                                dict(bits=2, symmetric=False, zero_point="float")], ids=str)
def test_model_save_reload(tiny, tmp_path, kw):
    kw = {"bits": 4, "group_size": 32, **kw}
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny)(x).logits
        q = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=hfquant.HfQuantConfig(**kw))
        y = q(x).logits
    layer = q.model.layers[0].mlp.down_proj
    assert isinstance(layer, hfquant.nn.QuantLinear)
    # the layer computes exactly the weight it stores, which is the config's grid
    w = AutoModelForCausalLM.from_pretrained(tiny).model.layers[0].mlp.down_proj.weight
    want = formats.fake_quantize(w, kw["bits"], 32, kw.get("symmetric", True), grid=kw.get("grid", "range"),
                                 zero_point=kw.get("zero_point", "integer"))
    assert torch.equal(layer.dequantize_weight(torch.float32), want)
    assert (y - ref).norm() / ref.norm() < {4: 0.2, 2: 1.5}[kw["bits"]]
    out = tmp_path / "q"
    hfquant.save_pretrained(q, out)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == 2
    r = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(r(x).logits, y)
    # an older hfquant (format 1 only) refuses the checkpoint by its version, not by a tensor
    saved["format_version"] = 4
    with pytest.raises(ValueError, match="format_version=4 is not supported"):
        hfquant.HfQuantConfig.from_dict(saved)


def test_float_offsets_refused_by_exports_qat_and_scale_training(tiny, tmp_path):
    cfg = hfquant.HfQuantConfig(bits=4, group_size=32, symmetric=False, zero_point="float")
    q = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg)
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(ExportError, match=f"has float offsets \\(zero_point='float'\\), which {fmt} cannot hold"):
            export_model(q, str(tmp_path / fmt), fmt)
    with pytest.raises(ValueError, match="enable_scale_training: the model holds layers with float offsets"):
        hfquant.enable_scale_training(q)
    from hfquant import qat

    with pytest.raises(ValueError, match="QAT simulates integer zero points; this config asks for zero_point='float'"):
        qat.prepare_qat(AutoModelForCausalLM.from_pretrained(tiny), cfg)


def test_signed_scales_export_as_zero_points_exactly(tiny, tmp_path):
    """A signed-scale group is written as codes 15 - c, zero point 7, scale |s|: the same weight."""
    from hfquant.interop.export import _unsigned_codes

    q = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32))
    layer = q.model.layers[0].mlp.down_proj
    assert (layer.scales < 0).any() and (layer.scales > 0).any()
    codes, zeros, scales = _unsigned_codes(layer)
    g = torch.arange(layer.in_features) // 32
    w = (codes - zeros[:, g]).double() * scales[:, g].double()
    assert (scales >= 0).all() and torch.equal(w.float(), layer.dequantize_weight(torch.float32))


def test_qat_on_the_signed_grid(tiny):
    from hfquant import qat

    model = AutoModelForCausalLM.from_pretrained(tiny)
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    qat.prepare_qat(model, hfquant.HfQuantConfig(bits=4, group_size=32))
    fake = model.model.layers[0].mlp.down_proj
    assert fake.grid == "best"
    assert torch.equal(fake.quantized_weight().detach(), formats.fake_quantize(w, 4, 32, True, grid="best"))
    qat.convert(model)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.grid == "best" and torch.equal(layer.dequantize_weight(torch.float32),
                                                formats.fake_quantize(w, 4, 32, True, grid="best"))


def test_cli_grid_options(tiny, tmp_path, capsys):
    from hfquant import cli

    assert cli.main(["quantize", str(tiny), str(tmp_path / "q"), "--bits", "4", "--group-size", "32",
                     "--grid", "extreme"]) == 0
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (saved["grid"], saved["format_version"]) == ("extreme", 2)
    assert cli.main(["quantize", str(tiny), str(tmp_path / "f"), "--bits", "4", "--group-size", "32",
                     "--asymmetric", "--zero-point", "float"]) == 0
    saved = json.loads((tmp_path / "f" / "config.json").read_text())["quantization_config"]
    assert (saved["zero_point"], saved["symmetric"]) == ("float", False)
    capsys.readouterr()
    assert cli.main(["quantize", str(tiny), str(tmp_path / "bad"), "--zero-point", "float"]) == 2
    assert "zero_point='float' applies to asymmetric schemes; set symmetric=False" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert cli.main(["quantize", str(tiny), str(tmp_path / "bad"), "--method", "gptq", "--grid", "best"]) == 2
    assert "--grid and --zero-point apply to --method rtn" in capsys.readouterr().err


def test_cli_rotation_option(tiny, tmp_path):
    from hfquant import cli

    assert cli.main(["quantize", str(tiny), str(tmp_path / "r"), "--bits", "8", "--rotation", "hadamard",
                     "--rotation-seed", "3"]) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["quantization_config"]
    assert (saved["rotation"], saved["rotation_seed"], saved["format_version"]) == ("hadamard", 3, 3)
    assert saved["rotation_online"] == ["down_proj"]
    assert cli.main(["quantize", str(tiny), str(tmp_path / "r2"), "--bits", "8", "--rotation", "hadamard",
                     "--rotation-online", "none"]) == 0
    saved = json.loads((tmp_path / "r2" / "config.json").read_text())["quantization_config"]
    assert (saved["format_version"], "rotation_online" in saved) == (2, False)
