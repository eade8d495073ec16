"""QuantLinear against the float layer it came from, state dicts, quantize_model on any nn.Module."""
import pytest
import torch
from torch import nn

import hfquant
from hfquant.nn import QuantLinear

SCHEMES = [(4, 128, True), (4, 64, False), (4, -1, True), (8, -1, True), (8, 32, False), (3, 128, False),
           (3, -1, True), (2, 64, False), (2, 128, True)]


@pytest.mark.parametrize("bits,gs,sym", SCHEMES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_dequantized_linear(bits, gs, sym, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(300, 37).to(dtype)
    q = QuantLinear.from_float(lin, bits, gs, sym)
    for M in (1, 3, 40):
        x = torch.randn(2, M, 300).to(dtype)
        ref = (x.double() @ q.dequantize_weight(torch.float64).t() + lin.bias.double())
        with hfquant.settings(int8_activations_min_m=None):  # the weight-only kernels at every M
            y = q(x)
        assert y.dtype == dtype and y.shape == (2, M, 37)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
        # the default (int8 activations from 16 rows on, 4-bit kernels): the activations' rounding
        # in blocks of 32 (max|x| / 127) on top
        y = q(x)
        assert y.dtype == dtype and y.shape == (2, M, 37)
        assert (y.double() - ref).abs().max() <= max(tol, 3e-2) * ref.abs().max()


@pytest.mark.parametrize("bits,sym", [(4, False), (3, False), (3, True), (2, False), (2, True)])
def test_state_dict_is_stable_across_packing(bits, sym):
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(61, 8), bits, 32, sym)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.pack()
    after = q.state_dict()
    assert list(before) == list(after) == ["qweight", "scales"] + (["zeros"] if not sym else []) + ["bias"]
    for k in before:
        assert torch.equal(before[k], after[k])
    assert "qweight" not in dict(q.named_buffers())  # one copy of the codes in memory


def test_cast_repacks():
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(64, 8), 8, -1, True)
    x = torch.randn(1, 64)
    y = q(x)
    q.to(torch.bfloat16)
    yb = q(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), y, rtol=3e-2, atol=3e-2)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(96, 64)
        self.b = nn.Sequential(nn.ReLU(), nn.Linear(64, 10, bias=False))
        self.lm_head = nn.Linear(10, 5)

    def forward(self, x):
        return self.lm_head(self.b(self.a(x)))


def test_quantize_model_any_module():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(4, 96)
    y0 = net(x)
    hfquant.quantize_model(net, hfquant.HfQuantConfig(bits=8, group_size=-1))
    assert isinstance(net.a, QuantLinear) and isinstance(net.b[1], QuantLinear)
    assert isinstance(net.lm_head, nn.Linear) and not isinstance(net.lm_head, QuantLinear)
    y1 = net(x)
    assert (y1 - y0).abs().max() < 0.02 * y0.abs().max()


def test_quantize_model_errors():
    with pytest.raises(ValueError, match="no nn.Linear"):
        hfquant.quantize_model(nn.Sequential(nn.ReLU()), hfquant.HfQuantConfig())
    with pytest.raises(ValueError, match="no module of that name"):
        hfquant.quantize_model(_Net(), hfquant.HfQuantConfig(modules_override={"nope": {"bits": 8}}))


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5), "bits=5"),
    (dict(group_size=48), "group_size=48"),
    (dict(group_size=0), "group_size=0"),
    (dict(symmetric="yes"), "symmetric"),
    (dict(method="magic"), "method="),
    (dict(format_version=4), "format_version=4"),
    (dict(modules_override={"x": {"bits": 5}}), "bits=5"),
    (dict(modules_override={"x": {"colour": 1}}), "modules_override"),
    (dict(wrong_arg=1), "unknown argument"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hfquant.HfQuantConfig(**kwargs)


def test_config_roundtrip():
    cfg = hfquant.HfQuantConfig(bits=8, group_size=64, symmetric=False, modules_override={"down_proj": {"bits": 4}})
    again = hfquant.HfQuantConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.scheme_for("model.layers.0.mlp.down_proj")["bits"] == 4
    assert again.scheme_for("model.layers.0.mlp.up_proj")["bits"] == 8


@pytest.mark.parametrize("bits,gs", [(4, 128), (8, -1)])
def test_torch_compile_fullgraph(bits, gs):
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(128, 24), bits, gs, True)
    q.pack()
    x = torch.randn(3, 128)
    compiled = torch.compile(q, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), q(x))


def test_weight_attribute_is_dequantized_copy():
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(64, 8), 4, 32, True)
    w = q.weight
    assert w.shape == (8, 64) and torch.equal(w, q.dequantize_weight())
    assert "weight" not in q.state_dict()


def test_int8_activations_switch():
    """hfquant.settings.int8_activations_min_m routes 4-bit layers' calls of at least that many
    rows through hfquant::qlinear_a8 (int8 activations), smaller calls, 8-bit layers and calls
    that need a gradient through qlinear."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q4 = QuantLinear.from_float(lin, 4, 32, True)
    q8 = QuantLinear.from_float(lin, 8, 32, True)
    k = q4._kernel()
    x1, x5 = torch.randn(1, 96), torch.randn(5, 96)
    a8 = lambda x: hfquant.ops.qlinear_a8(x, k["packed_weight"], k["packed_scales"], q4.bias, 4, 32, 40, 96)  # noqa: E731
    with torch.no_grad():
        plain1, plain5 = q4(x1), q4(x5)
        assert not torch.equal(a8(x5), plain5)  # int8 activations change the result
        with hfquant.settings(int8_activations_min_m=4):
            assert torch.equal(q4(x5), a8(x5)) and torch.equal(q4(x1), plain1)
            k8 = q8._kernel()
            assert torch.equal(q8(x5), hfquant.ops.qlinear(x5, k8["packed_weight"], k8["packed_scales"], q8.bias, 8,
                                                           32, 40, 96))  # 8-bit: qlinear
        with hfquant.settings(int8_activations_min_m=1):
            assert torch.equal(q4(x1), a8(x1))
    with hfquant.settings(int8_activations_min_m=1):
        xg = x5.clone().requires_grad_()
        y = q4(xg)  # a gradient is wanted: qlinear, which has one
        torch.testing.assert_close(y.detach(), plain5)
        y.sum().backward()
        assert xg.grad is not None
    x16 = torch.randn(16, 96)
    with torch.no_grad():  # the default: calls of 16 rows and more (prefill), decode steps weight-only
        assert hfquant.settings.int8_activations_min_m == 16
        assert torch.equal(q4(x16), a8(x16)) and torch.equal(q4(x1), plain1)
        with hfquant.settings(int8_activations_min_m=None):
            assert not torch.equal(q4(x16), a8(x16))
    with pytest.raises(ValueError, match="int8_activations_min_m"):
        hfquant.settings.int8_activations_min_m = 0
