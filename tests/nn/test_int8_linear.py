"""Int8Linear (W8A8, LLM.int8) against the float layer it came from; state dicts, compile, casts."""
import copy

import pytest
import torch
from torch import nn

import hfquant
from hfquant import ref
from hfquant.nn import Int8Linear


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_close_to_float_layer(threshold):
    torch.manual_seed(0)
    lin = nn.Linear(300, 70)
    x = torch.randn(2, 5, 300)
    x[..., 11] = 25.0  # an outlier column
    q = Int8Linear.from_float(lin, threshold)
    y, r = q(x), lin(x)
    assert y.shape == r.shape
    # LLM.int8 keeps the outlier column exact; w8a8 pays for it in every row's scale
    assert _rel(y, r) < (0.01 if threshold else 0.05)
    expect = ref.int8_linear_ref(x, q.packed_weight, q.colsum, q.w_scales, q.bias, None, threshold, 70)
    assert torch.allclose(y, expect, rtol=1e-4, atol=1e-4)


def test_smooth_factors_applied_in_the_op():
    torch.manual_seed(1)
    lin = nn.Linear(64, 16, bias=False)
    s = torch.rand(64) * 4 + 0.25
    smoothed = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        smoothed.weight.copy_(lin.weight * s)  # what SmoothQuant leaves in the weight
    q = Int8Linear.from_float(smoothed, smooth=s)
    x = torch.randn(8, 64)
    assert _rel(q(x), lin(x)) < 0.08  # random factors make the int8 ranges uneven, hence the margin
    # without the division inside the op the layer would compute x @ (W * s)^T
    assert _rel(Int8Linear.from_float(smoothed)(x), lin(x)) > 0.3
    assert torch.allclose(q.dequantize_weight(), lin.weight, atol=0.02)
    assert q.act_scale.dtype == torch.float32 and torch.allclose(q.act_scale, 1 / s)


def test_state_dict_round_trip_and_casts():
    torch.manual_seed(2)
    q = Int8Linear.from_float(nn.Linear(96, 40), 6.0)
    x = torch.randn(3, 96)
    y = q(x)
    sd = q.state_dict()
    assert list(sd) == ["qweight", "scales", "bias"] and sd["qweight"].dtype == torch.int8
    fresh = Int8Linear(96, 40, True, 6.0)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)
    dup = copy.deepcopy(q)
    assert torch.equal(dup(x), y)
    q.to(torch.bfloat16)  # drops the kernel layout; the canonical tensors are cast
    assert q.scales.dtype == torch.bfloat16 and q(x.bfloat16()).dtype == torch.bfloat16
    lin = q.to_linear(torch.float32)
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (40, 96)


def test_torch_compile_fullgraph():
    torch.manual_seed(3)
    q = Int8Linear.from_float(nn.Linear(128, 48), 6.0)
    q.pack()
    x = torch.randn(4, 128)
    x[:, 3] = 30.0
    compiled = torch.compile(q, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), q(x))


def test_validation_names_the_tensor():
    q = Int8Linear.from_float(nn.Linear(32, 8), smooth=torch.ones(32))
    q.smooth = torch.full((32,), float("nan"))
    with pytest.raises(ValueError, match="layer.smooth must hold finite positive"):
        q.validate("layer")
    with pytest.raises(ValueError, match="threshold"):
        Int8Linear(4, 4, False, threshold=-1.0)


def test_quantize_model_on_any_module():
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(5, 64)
    ref_y = net(x)
    hfquant.quantize_model(net, hfquant.HfQuantConfig(method="w8a8", modules_to_not_convert=[]))
    assert isinstance(net[0], Int8Linear) and isinstance(net[2], Int8Linear)
    assert _rel(net(x), ref_y) < 0.05
