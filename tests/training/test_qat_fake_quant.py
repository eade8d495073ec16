"""Fake-quant layers (STE, learned scales) and prepare_qat / convert, on single layers and on a
2-layer slice of the real default model trained on WikiText-2 validation text."""
import pytest
import torch
from _utils import assert_close, train_losses
from transformers import AutoModelForCausalLM

import hfquant
from hfquant import formats
from hfquant.nn import QuantLinear
from hfquant.qat import FakeQuantLinear

SCHEMES = [(4, -1, True), (4, 32, False), (4, 128, True), (8, -1, False), (8, 64, True)]
IDS = [f"w{b}{'c' if g == -1 else f'g{g}'}{'' if s else 'a'}" for b, g, s in SCHEMES]
N, K = 37, 300  # 300 leaves short last groups of 32 and 128 (and 64)


def _linear(seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N)
    lin.weight.data[3] = 0.0  # an all-zero row: scale 0, code z
    return lin


@pytest.mark.parametrize("bits,group_size,symmetric", SCHEMES, ids=IDS)
def test_fake_quant_matches_rtn_and_kernel(bits, group_size, symmetric):
    lin = _linear()
    f = FakeQuantLinear.from_linear(lin, bits, group_size, symmetric)
    q = formats.quantize_rtn(lin.weight.detach(), bits, group_size, symmetric)
    # the simulated weight is what round to nearest stores
    assert torch.equal(f.quantized_weight(), formats.fake_quantize(lin.weight, bits, group_size, symmetric))
    real = f.to_quantized()
    assert torch.equal(real.qweight, q.qweight) and torch.equal(real.scales, q.scales)
    assert (real.zeros is None) == symmetric and (symmetric or torch.equal(real.zeros, q.zeros))
    x = torch.randn(2, 7, K)
    expected = x.double() @ f.quantized_weight().double().t() + lin.bias.double()
    assert_close(f(x), expected, msg="fake-quant forward")
    assert_close(real(x), expected, msg="converted (native kernel)")


@pytest.mark.parametrize("bits,group_size,symmetric", SCHEMES, ids=IDS)
def test_ste_and_learned_scale_gradients(bits, group_size, symmetric):
    lin = _linear()
    f = FakeQuantLinear.from_linear(lin, bits, group_size, symmetric, learn_scales=True)
    x = torch.randn(11, K)
    gy = torch.randn(11, N)
    f(x).backward(gy)
    s, z = f.quant_params()
    lo, hi = formats.v1.code_range(bits, symmetric)
    g = K if group_size == -1 else group_size
    gidx = torch.arange(K) // g
    w = f.weight.detach()
    ratio = w / torch.where(s > 0, s, torch.ones_like(s))[:, gidx]
    raw = torch.round(ratio) + z[:, gidx]
    inside = (raw >= lo) & (raw <= hi)
    gw = gy.t() @ x
    # STE: the weight gradient is the float layer's, zeroed where the code clamps and in a
    # group of scale 0 (an all-zero group stands for zeros whatever the weight)
    live = (s > 0)[:, gidx]
    torch.testing.assert_close(f.weight.grad, gw * inside * live, rtol=1e-5, atol=1e-6)
    # LSQ: d w_q / d s = round(w/s) - w/s inside the range, the clamped code - z outside
    code = torch.clamp(raw, lo, hi)
    dws = torch.where(inside, torch.round(ratio) - ratio, code - z[:, gidx])
    gs = torch.zeros_like(s).index_add_(1, gidx, gw * dws)
    # sums of ~K terms of both signs, each the difference of code and w/s (up to 127 at 8 bits):
    # float32 error relative to the magnitudes summed
    mag = torch.zeros_like(s).index_add_(1, gidx, gw.abs() * (ratio.abs() + 1))
    assert ((f.scale.grad.float() - gs).abs() <= 1e-5 * mag + 1e-7).all()


def test_learned_scales_convert_exactly():
    lin = _linear()
    f = FakeQuantLinear.from_linear(lin, 4, 32, False, learn_scales=True)
    with torch.no_grad():
        f.scale.mul_(torch.empty_like(f.scale).uniform_(0.7, 1.1))
        f.weight.add_(torch.randn_like(f.weight) * 0.01)
    real = f.to_quantized()
    assert torch.equal(real.scales, f.scale.detach())
    assert torch.equal(formats.v1.unpack_int4(real.qweight, K).float(), f.codes())
    x = torch.randn(5, K)
    assert_close(real(x), x.double() @ f.quantized_weight().double().t() + lin.bias.double())


@pytest.fixture(scope="module")
def slice_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=2)


@pytest.fixture(scope="module")
def train_ids(tokenizer):
    from hfquant.algorithms.calibration import calibration_batches

    # short windows: the 49152-entry output head dominates the cost of a step
    return torch.cat(calibration_batches(tokenizer, None, n_samples=2, seq_len=48))


@pytest.mark.parametrize("learn_scales", [True], ids=["lsq"])  # STE alone: single-layer tests above
def test_prepare_train_convert_save_reload(slice_model, train_ids, tokenizer, wikitext, tmp_path, learn_scales):
    import copy

    model = copy.deepcopy(slice_model)
    cfg = hfquant.HfQuantConfig(bits=4, group_size=-1)
    hfquant.prepare_qat(model, cfg, learn_scales=learn_scales)
    fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert len(fakes) == 14 and not isinstance(model.lm_head, FakeQuantLinear)  # 7 per layer; lm_head kept
    params = [p for m in fakes.values() for p in (m.weight, m.scale) if p is not None]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    losses = train_losses(model, opt, train_ids, 4)
    assert losses[-1] < losses[0] - 0.1, losses
    test_ids = tokenizer(wikitext[:3000], return_tensors="pt").input_ids[:, :64]
    codes = {n: m.codes() for n, m in fakes.items()}
    model.eval()
    with torch.no_grad():
        fake_logits = model(test_ids).logits
    hfquant.convert(model)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    for n, c in codes.items():
        layer = model.get_submodule(n)
        assert isinstance(layer, QuantLinear)
        assert torch.equal(formats.v1.unpack_int4(layer._canonical_qweight(), layer.in_features).float(), c), n
    with torch.no_grad():
        real_logits = model(test_ids).logits
    # same model up to float32 accumulation order (kernel vs F.linear) through 2 layers
    assert_close(real_logits, fake_logits.double(), dtype=torch.float32, msg="converted logits")
    assert (real_logits.argmax(-1) == fake_logits.argmax(-1)).float().mean() > 0.99
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert again.config.quantization_config["bits"] == 4 if isinstance(again.config.quantization_config, dict) \
        else again.config.quantization_config.bits == 4
    with torch.no_grad():
        assert torch.equal(again(test_ids).logits, real_logits)


def test_errors(slice_model, model_dir):
    import copy

    with pytest.raises(ValueError, match="holds no FakeQuantLinear"):
        hfquant.convert(copy.deepcopy(slice_model))
    for method, bits, why in (("w8a8", 8, "activations"), ("kmeans", 4, "codebook"), ("gptq", 4, "calibration")):
        cfg = hfquant.HfQuantConfig(method=method, bits=bits, group_size=-1)
        with pytest.raises(ValueError, match=f"not trainable by QAT.*{why}"):
            hfquant.prepare_qat(copy.deepcopy(slice_model), cfg)
    quantized = hfquant.quantize_model(copy.deepcopy(slice_model), hfquant.HfQuantConfig(bits=4, group_size=128))
    with pytest.raises(ValueError, match="already quantized"):
        hfquant.prepare_qat(quantized, hfquant.HfQuantConfig(bits=4))
    prepared = hfquant.prepare_qat(copy.deepcopy(slice_model), hfquant.HfQuantConfig(bits=4))
    with pytest.raises(ValueError, match="already holds FakeQuantLinear"):
        hfquant.prepare_qat(prepared, hfquant.HfQuantConfig(bits=4))
    with pytest.raises(ValueError, match="either a config or keyword"):
        hfquant.prepare_qat(copy.deepcopy(slice_model), hfquant.HfQuantConfig(bits=4), bits=8)
