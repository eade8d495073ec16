"""Distillation on a 2-layer slice of the real default model: layer-by-layer (ZeroQuant LKD)
lowers each block's error against the float block and the model's error against the float
logits on held-out text; data-free QAT (LLM-QAT) lowers the KL to the float model."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.algorithms.calibration import calibration_batches
from hfquant.nn import QuantLinear
from hfquant.qat.distill import distill_qat, generate_text, layerwise_distill

CFG = dict(bits=4, group_size=-1)


@pytest.fixture(scope="module")
def slice_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=2)


def test_layerwise_distill(slice_model, tokenizer, wikitext, tmp_path):
    model = copy.deepcopy(slice_model)
    lines = []
    batches = calibration_batches(tokenizer, None, n_samples=4, seq_len=64)
    layerwise_distill(model, hfquant.HfQuantConfig(**CFG), tokenizer, batches=batches, epochs=3, lr=1e-4,
                      log=lines.append)
    assert len(lines) == 2
    for line in lines:  # "<block>: mse A (round to nearest) -> B"
        before, after = float(line.split("mse ")[1].split(" ")[0]), float(line.rsplit("-> ", 1)[1])
        assert after < 0.95 * before, line
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    # held-out text: closer to the float model's logits than round to nearest
    ids = tokenizer(wikitext[:4000], return_tensors="pt").input_ids[:, :96]
    rtn = hfquant.quantize_model(copy.deepcopy(slice_model), hfquant.HfQuantConfig(**CFG))
    with torch.no_grad():
        ref = slice_model(ids).logits
        err_rtn = (rtn(ids).logits - ref).pow(2).mean()
        err_lkd = (model(ids).logits - ref).pow(2).mean()
    assert err_lkd < err_rtn, (float(err_lkd), float(err_rtn))
    model.save_pretrained(tmp_path / "lkd")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "lkd")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_layerwise_distill_errors(slice_model):
    with pytest.raises(ValueError, match="not trainable by QAT"):
        layerwise_distill(copy.deepcopy(slice_model), hfquant.HfQuantConfig(method="w8a8"), batches=[])
    with pytest.raises(ValueError, match="nothing to train"):
        layerwise_distill(copy.deepcopy(slice_model), hfquant.HfQuantConfig(**CFG), batches=[], train_weights=False,
                          learn_scales=False)


def test_data_free_qat(slice_model, tokenizer):
    model = copy.deepcopy(slice_model)
    texts = generate_text(model, tokenizer, n_sequences=2, length=24, batch_size=2)
    assert len(texts) == 2 and all(t.shape == (1, 24) for t in texts)
    batch = [torch.cat(texts)]
    kls = []
    distill_qat(model, hfquant.HfQuantConfig(**CFG), batch, teacher=slice_model, steps=5, lr=1e-4,
                log=lambda step, kl: kls.append(kl))
    assert len(kls) == 5 and kls[-1] < 0.8 * kls[0], kls
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
