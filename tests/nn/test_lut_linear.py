"""LutLinear against the float layer it came from, state dicts, validation, config, quantize_model."""
import pytest
import torch
from torch import nn

import hfquant
from hfquant.nn import LutLinear


@pytest.mark.parametrize("bits,gs", [(4, -1), (3, 64), (2, 32)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_dequantized_linear(bits, gs, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(300, 37).to(dtype)
    q = LutLinear.from_float(lin, bits, gs)
    assert q.codebook.dtype == dtype and q.codebook.shape == (37, 1 if gs == -1 else -(-300 // gs), 1 << bits)
    for M in (1, 3, 40):
        x = torch.randn(2, M, 300).to(dtype)
        ref = x.double() @ q.dequantize_weight(torch.float64).t() + lin.bias.double()
        y = q(x)
        assert y.dtype == dtype and y.shape == (2, M, 37)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    # and it approximates the float layer
    w = lin.weight.float()
    assert ((q.dequantize_weight(torch.float32) - w) ** 2).mean() < 0.05 * (w ** 2).mean()


def test_state_dict_is_stable_across_packing_and_cast():
    torch.manual_seed(0)
    q = LutLinear.from_float(nn.Linear(70, 9), 3, 32)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.pack()
    after = q.state_dict()
    assert list(before) == list(after) == ["qweight", "codebook", "bias"]
    for k in before:
        assert torch.equal(before[k], after[k])
    assert "qweight" not in dict(q.named_buffers())  # one copy of the indices in memory
    x = torch.randn(2, 70)
    y = q(x)
    q.to(torch.bfloat16)
    assert torch.equal(q.state_dict()["qweight"], before["qweight"])
    assert torch.allclose(q(x.bfloat16()).float(), y, rtol=3e-2, atol=3e-2)


def test_load_state_dict_into_fresh_module_and_validate():
    torch.manual_seed(0)
    src = LutLinear.from_float(nn.Linear(64, 8), 4, -1)
    src.pack()
    dst = LutLinear(64, 8, True, 4, -1)
    dst.load_state_dict(src.state_dict())
    dst.validate("layer")
    x = torch.randn(3, 64)
    assert torch.equal(dst(x), src(x))
    bad = LutLinear(64, 8, True, 4, -1)
    sd = src.state_dict()
    sd["codebook"] = sd["codebook"].clone()
    sd["codebook"][2, 0, 3] = float("nan")
    bad.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"layer\.codebook contains NaN"):
        bad.validate("layer")
    bad.load_quantized(torch.zeros(8, 31, dtype=torch.uint8), src.codebook)
    with pytest.raises(ValueError, match=r"layer\.qweight has shape \(8, 31\).*expected \(8, 32\)"):
        bad.validate("layer")
    bad.load_quantized(src.state_dict()["qweight"], src.codebook[:, :, :8])
    with pytest.raises(ValueError, match=r"layer\.codebook has shape \(8, 1, 8\)"):
        bad.validate("layer")


def test_quantize_model_kmeans_and_to_linear():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(4, 96)
    y0 = net(x)
    hfquant.quantize_model(net, hfquant.HfQuantConfig(bits=4, method="kmeans", modules_to_not_convert=[]))
    assert isinstance(net[0], LutLinear) and isinstance(net[2], LutLinear)
    assert (net(x) - y0).abs().max() < 0.1 * y0.abs().max()
    lin = net[0].to_linear()
    assert isinstance(lin, nn.Linear) and torch.equal(lin.weight, net[0].weight)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    q = LutLinear.from_float(nn.Linear(128, 24), 4, 32)
    q.pack()
    x = torch.randn(3, 128)
    compiled = torch.compile(q, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), q(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="kmeans", bits=8), "bits=8 is not supported by method 'kmeans'"),
    (dict(method="kmeans", bits=1), "bits=1"),
    (dict(method="kmeans", group_size=48), "group_size=48"),
    (dict(method="kmeans", symmetric=False), "symmetric=False does not apply"),
    (dict(method="kmeans", kmeans_init="random"), "kmeans_init='random'"),
    (dict(method="kmeans", kmeans_max_iter=0), "kmeans_max_iter=0"),
    (dict(method="kmeans", modules_override={"x": {"bits": 8}}), "bits=8"),
    (dict(method="rtn", bits=6), "bits=6"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hfquant.HfQuantConfig(**kwargs)


def test_config_defaults_and_roundtrip():
    cfg = hfquant.HfQuantConfig(method="kmeans")
    assert (cfg.bits, cfg.group_size, cfg.short_name) == (4, -1, "km4c")
    cfg = hfquant.HfQuantConfig(method="kmeans", bits=3, group_size=128, kmeans_init="kmeans++", kmeans_seed=5,
                                modules_override={"down_proj": {"bits": 4}})
    assert cfg.short_name == "km3g128"
    again = hfquant.HfQuantConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.kmeans_init == "kmeans++" and again.kmeans_seed == 5
    assert again.scheme_for("model.layers.0.mlp.down_proj")["bits"] == 4
