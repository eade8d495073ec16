"""GPTQ and AWQ: properties on real layers and inputs of SmolLM2-135M (reconstruction error
below round-to-nearest's, exactness where the theory says so), the layer-by-layer pipeline,
and the methods end to end (calibrate on load, save, reload, generate) on a 4-layer slice of
the real model."""
from __future__ import annotations

import copy

import pytest

import torch
from transformers import AutoModelForCausalLM

import hfquant
from hfquant import HfQuantConfig, formats, quantize_model
from hfquant.algorithms.awq import _clip_weight, awq_block, search_clip
from hfquant.algorithms.gptq import HessianAccumulator, dequantized_weight, gptq_quantize
from hfquant.algorithms.layerwise import (calibrate_blocks, capture_block_inputs, decoder_blocks, linear_layers,
                                          run_block)
from hfquant.algorithms.calibration import calibration_batches
from hfquant.nn import QuantLinear
from hfquant.modeling import set_module

SCHEMES = [(4, 128, True), (4, 64, False), (4, -1, True), (8, -1, True), (4, 32, False)]


@pytest.fixture(scope="module")
def small_model(model_dir):
    """The real model cut to its first 4 decoder layers (the rest of the checkpoint unused)."""
    return AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=4)


@pytest.fixture(scope="module")
def block_inputs(small_model, tokenizer):
    """Inputs of decoder block 2 for 4 windows of 128 tokens of WikiText-2 validation."""
    batches = calibration_batches(tokenizer, n_samples=4, seq_len=128)
    _, blocks = decoder_blocks(small_model)
    inputs = capture_block_inputs(small_model, blocks, batches)
    for i in range(2):
        inputs = run_block(blocks[i], inputs)
    return inputs


def _layer_inputs(model, inputs, name: str) -> torch.Tensor:
    _, blocks = decoder_blocks(model)
    mod = dict(blocks[2].named_modules())[name]
    xs = []
    h = mod.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
    try:
        run_block(blocks[2], inputs)
    finally:
        h.remove()
    return torch.cat(xs), mod.weight.detach().clone()


def _output_error(w: torch.Tensor, deq: torch.Tensor, H: torch.Tensor) -> float:
    d = w.float() - deq.float()
    return float((d @ H * d).sum() / (w.float() @ H * w.float()).sum())


def _rtn_deq(w, bits, gs, sym):
    q = formats.quantize_rtn(w, bits, gs, sym)
    return formats.dequantize(q.qweight, q.scales, q.zeros, bits, gs, w.shape[1], torch.float32)


# ----------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("layer,bits,gs,sym", [("self_attn.q_proj", *s) for s in SCHEMES]
                         + [("mlp.down_proj", 4, 128, True), ("mlp.down_proj", 4, -1, True)])
def test_gptq_reconstruction_error_below_rtn_on_real_layer(small_model, block_inputs, layer, bits, gs, sym):
    x, w = _layer_inputs(small_model, block_inputs, layer)
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    H = acc.hessian()
    rtn = _output_error(w, _rtn_deq(w, bits, gs, sym), H)
    for act_order in (False, True):
        res = gptq_quantize(w, H, bits, gs, sym, act_order=act_order)
        err = _output_error(w, dequantized_weight(res), H)
        assert abs(err - res.error) <= 1e-3 * max(err, 1e-9) + 1e-9
        # GPTQ minimises exactly this error; on real inputs it removes a large share of RTN's
        assert err < 0.8 * rtn, (act_order, err, rtn)
        q = res.quantized
        formats.validate(layer, q.qweight, q.scales, q.zeros, bits, gs, w.shape[1], w.shape[0], sym)
        assert (res.perm is not None) == act_order


@pytest.mark.parametrize("bits,gs,sym", SCHEMES)
def test_gptq_with_identity_hessian_is_round_to_nearest(bits, gs, sym):
    # Uncorrelated inputs of equal power: no error can be compensated, GPTQ rounds like RTN.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 300, generator=g)
    res = gptq_quantize(w, torch.eye(300), bits, gs, sym, act_order=False, clip_search=False)
    q = formats.quantize_rtn(w, bits, gs, sym)
    assert torch.equal(res.quantized.qweight, q.qweight)
    assert torch.equal(res.quantized.scales, q.scales)
    assert (q.zeros is None and res.quantized.zeros is None) or torch.equal(res.quantized.zeros, q.zeros)


def test_gptq_perm_layer_computes_with_the_dequantized_weight(small_model, block_inputs):
    x, w = _layer_inputs(small_model, block_inputs, "mlp.up_proj")
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    res = gptq_quantize(w, acc.hessian(), 4, 64, False, act_order=True)
    assert not torch.equal(res.perm, torch.arange(w.shape[1]))
    layer = QuantLinear.from_quantized(res.quantized, None, res.perm)
    layer.validate("up_proj")
    deq = dequantized_weight(res)
    torch.testing.assert_close(layer.dequantize_weight(torch.float32), deq)
    with hfquant.settings(int8_activations_min_m=None):  # the weight-only kernel (33 rows would take int8 activations)
        y = layer(x[:33])
    ref = x[:33].double() @ deq.double().t()
    assert float((y.double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    # the state dict holds the canonical tensors and the permutation, and loads back
    sd = layer.state_dict()
    assert list(sd) == ["qweight", "scales", "zeros", "perm"] and sd["perm"].dtype == torch.int32
    again = QuantLinear(w.shape[1], w.shape[0], False, 4, 64, False, act_order=True)
    again.load_state_dict(sd)
    assert torch.equal(again(x[:5]), layer(x[:5]))


def test_gptq_dead_inputs_and_degenerate_hessians():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    x[:, 5] = 0  # an input channel that never fires: its weights do not matter
    acc = HessianAccumulator(64)
    acc.add(x)
    res = gptq_quantize(w, acc.hessian(), 4, 32, True)
    assert torch.isfinite(res.quantized.scales).all()
    # no tokens at all: a clear error
    with pytest.raises(ValueError, match="no calibration tokens"):
        HessianAccumulator(64).hessian()
    with pytest.raises(ValueError, match="NaN or Inf"):
        HessianAccumulator(4).add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="do not match"):
        gptq_quantize(w, torch.eye(63), 4, 32, True)
    # a Hessian with a negative eigenvalue no dampening fixes
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(64) * 1e3 + torch.ones(64, 64), 4, 32, True)


# ----------------------------------------------------------------------------- AWQ


def _block_outputs(block, inputs):
    return torch.cat([a[0] for a, _ in run_block(block, inputs)])


def _rtn_block(block, targets):
    for n, m in linear_layers(block).items():
        if n in targets:
            m.weight.data.copy_(_rtn_deq(m.weight.detach(), 4, 128, True).to(m.weight.dtype))


def test_awq_scaling_keeps_the_float_block_and_lowers_the_quantized_error(small_model, block_inputs):
    _, blocks = decoder_blocks(small_model)
    ref = _block_outputs(blocks[2], block_inputs)
    scheme = {"bits": 4, "group_size": 128, "symmetric": True}

    def run(clip: bool):
        block = copy.deepcopy(blocks[2])
        targets = {n: (m, False, scheme) for n, m in linear_layers(block).items()}
        chosen, outputs = awq_block(small_model, block, block_inputs, targets, clip_search=clip)
        got = torch.cat([a[0] for a, _ in outputs])
        # the outputs it returns (the next block's inputs) are those of this block rounded
        rounded = copy.deepcopy(block)
        _rtn_block(rounded, targets)
        want = _block_outputs(rounded, block_inputs)
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
        return block, targets, chosen

    scaled, targets, chosen = run(clip=False)
    assert set(chosen) == set(targets)  # every layer of a Llama block has a foldable previous op
    # scaling alone is folded exactly: the float block computes the same function
    out = _block_outputs(scaled, block_inputs)
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    plain = copy.deepcopy(blocks[2])
    _rtn_block(plain, targets)
    _rtn_block(scaled, targets)
    err_rtn = float((_block_outputs(plain, block_inputs) - ref).pow(2).mean())
    err_awq = float((_block_outputs(scaled, block_inputs) - ref).pow(2).mean())
    assert err_awq < err_rtn
    clipped, _, _ = run(clip=True)
    _rtn_block(clipped, targets)
    err_clip = float((_block_outputs(clipped, block_inputs) - ref).pow(2).mean())
    assert err_clip < err_rtn


@pytest.mark.parametrize("sym,separate", [(True, False), (False, False), (False, True)],
                         ids=["symmetric", "asymmetric", "asymmetric-separate"])
def test_awq_clip_search_never_raises_the_realized_group_error(sym, separate):
    """The clipped weights, rounded as the checkpoint stores them, never have a larger
    output error per group than the unclipped ones (the search scores exactly what
    clamping and round-to-nearest then give; symmetric: without the lowest code)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 256, generator=g)
    w[:, 3] *= 8  # an outlier column that a full range would waste steps on
    w[::2, 70] = -6.0  # groups whose largest magnitude is negative
    x = torch.randn(64, 256, generator=g)
    scheme = {"bits": 4, "group_size": 64, "symmetric": sym}
    c_lo, c_hi = search_clip(x.t() @ x / x.shape[0], w, scheme, torch.float32, separate=separate)
    assert c_lo.shape == c_hi.shape == (24, 4)
    for c in (c_lo, c_hi):
        assert float(c.min()) >= 0.5 and float(c.max()) <= 1.0
    assert bool((c_lo < 1).any() or (c_hi < 1).any())  # the outliers are clipped somewhere
    if sym or not separate:
        assert torch.equal(c_lo, c_hi)
    else:
        assert not torch.equal(c_lo, c_hi)
    layer = torch.nn.Linear(256, 24, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    _clip_weight(layer, False, c_lo, c_hi, scheme)
    clipped = formats.fake_quantize(layer.weight.detach(), 4, 64, sym)
    full = formats.fake_quantize(w, 4, 64, sym)

    def group_errors(deq):  # [24, 4]: the output error of each group of 64 inputs
        d = (deq - w).view(24, 4, 64)
        xs = x.view(64, 4, 64)
        return torch.einsum("tgk,ngk->tng", xs, d).pow(2).sum(0)

    assert bool((group_errors(clipped) <= group_errors(full) * (1 + 1e-5) + 1e-6).all())
    assert float(group_errors(clipped).sum()) < 0.95 * float(group_errors(full).sum())


# ----------------------------------------------------------------------------- pipeline


def test_layerwise_pipeline_visits_every_block_in_order_with_float_or_quantized_inputs(small_model, tokenizer):
    model = copy.deepcopy(small_model)
    batches = calibration_batches(tokenizer, n_samples=2, seq_len=32)
    seen = []

    def process(i, name, block, inputs):
        seen.append((i, name, len(inputs), tuple(inputs[0][0][0].shape)))

    calibrate_blocks(model, batches, process, desc="test")
    assert [s[:2] for s in seen] == [(i, f"model.layers.{i}") for i in range(4)]
    assert all(s[2] == 2 and s[3] == (1, 32, 576) for s in seen)
    assert all(not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_method_on_load_save_reload_generate(model_dir, tokenizer, tmp_path, method):
    cfg = HfQuantConfig(bits=4, group_size=64, symmetric=False, method=method,
                        calibration={"n_samples": 4, "seq_len": 64})
    model = AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=4, quantization_config=cfg)
    layers = [m for m in model.modules() if type(m) is QuantLinear]
    assert len(layers) == 4 * 7
    assert model.model.embed_tokens.bits == 8  # the default below 8 bits (round to nearest)
    assert all((m.perm is not None) == (method == "gptq") for m in layers)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.method == method
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
    out = again.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    # the float model with the dequantized weights computes the same (the checkpoint holds
    # exactly what the layers compute with)
    deq = copy.deepcopy(again)
    for name, m in list(deq.named_modules()):
        if isinstance(m, QuantLinear):
            set_module(deq, name, m.to_linear(torch.float32))
    with torch.no_grad():
        ref = deq(ids).logits
    assert float((ref - logits).abs().max()) <= 1e-3 * float(ref.abs().max())


def test_quantize_model_gptq_is_deterministic_and_beats_rtn(small_model, tokenizer):
    ids = torch.cat(calibration_batches(tokenizer, n_samples=2, seq_len=128, seed=7))  # held-out windows
    with torch.no_grad():
        ref = torch.log_softmax(small_model(ids).logits.float(), -1)

    def kl(model):
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits.float(), -1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    results = {}
    for method in ("rtn", "gptq", "gptq"):
        m = copy.deepcopy(small_model)
        # rtn takes no calibration (a setting of another method is refused by name)
        calib = {} if method == "rtn" else {"calibration": {"n_samples": 4, "seq_len": 128}}
        quantize_model(m, HfQuantConfig(bits=4, group_size=128, method=method, **calib), tokenizer=tokenizer)
        results.setdefault(method, []).append((kl(m), m.state_dict()))
    (kl_rtn, _), = results["rtn"]
    (kl_a, sd_a), (kl_b, sd_b) = results["gptq"]
    assert kl_a == kl_b and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert kl_a < 0.7 * kl_rtn, (kl_a, kl_rtn)


def test_calibrated_method_bad_input(model_dir, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="n_samples"):
        HfQuantConfig(method="gptq", calibration={"n_samples": 0})
    with pytest.raises(ValueError, match="damp"):
        HfQuantConfig(method="gptq", damp=0)
    with pytest.raises(ValueError, match="act_order"):
        HfQuantConfig(method="gptq", act_order="yes")
    with pytest.raises(ValueError, match="unknown key"):
        HfQuantConfig(method="awq", calibration={"samples": 3})
    with pytest.raises(ValueError, match="smoothquant_alpha"):
        HfQuantConfig(method="gptq", smoothquant_alpha=0.5)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.", encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for text, err, match in ((str(short), ValueError, "calibration text has"),
                             (str(tmp_path / "missing.txt"), FileNotFoundError, "no calibration text file")):
        for method in ("gptq", "awq"):
            cfg = HfQuantConfig(method=method, calibration={"text": text, "n_samples": 4, "seq_len": 64})
            with pytest.raises(err, match=match):
                quantize_model(model, cfg, tokenizer=tokenizer)
            # nothing was touched
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_quantize_gptq_and_flag_errors(model_dir, tokenizer, tmp_path, capsys):
    from hfquant.cli import main

    src = tmp_path / "src"
    AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=2).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    rc = main(["quantize", str(src), str(out), "--method", "gptq", "--group-size", "64", "--no-act-order",
               "--damp", "0.05", "--calib-samples", "2", "--calib-seq-len", "32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "gptq" in printed and "act_order" in printed
    again = AutoModelForCausalLM.from_pretrained(out)
    q = again.config.quantization_config
    assert (q.method, q.act_order, q.damp, q.group_size) == ("gptq", False, 0.05, 64)
    assert q.calibration == {"text": None, "n_samples": 2, "seq_len": 32}
    assert all(m.perm is None for m in again.modules() if isinstance(m, QuantLinear))
    rc = main(["quantize", str(src), str(tmp_path / "bad"), "--damp", "0.1"])
    assert rc == 2 and "--damp" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
