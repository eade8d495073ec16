"""Scale-only fine-tuning (PEQA) of a quantized 2-layer slice of the real default model, and
the plain transformers Trainer on a QAT model and on a scale-trainable quantized model."""
import copy
import json

import pytest
import torch
from _utils import train_losses
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hfquant
from hfquant.nn import QuantLinear
from hfquant.qat import ScaleTrainableQuantLinear
from hfquant.qat.scale_training import scale_parameters


@pytest.fixture(scope="module")
def batch(tokenizer):
    from hfquant.algorithms.calibration import calibration_batches

    return torch.cat(calibration_batches(tokenizer, None, n_samples=2, seq_len=48))


@pytest.fixture(scope="module")
def quantized_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("w4ca") / "model"
    cfg = hfquant.HfQuantConfig(bits=4, group_size=-1, symmetric=False)
    AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=2, quantization_config=cfg).save_pretrained(out)
    return out


def test_scale_training_trains_saves_and_reloads(quantized_dir, batch, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    before = load_file(quantized_dir / "model.safetensors")
    hfquant.enable_scale_training(model)
    layers = [m for m in model.modules() if isinstance(m, ScaleTrainableQuantLinear)]
    assert len(layers) == 14
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith((".scales", ".zeros"))}
    assert len(trainable) == 28
    assert model.hf_quantizer.is_trainable and model.hf_quantizer.is_qat_trainable
    opt = torch.optim.Adam(scale_parameters(model), lr=1e-3)
    losses = train_losses(model, opt, batch, 4)
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    with torch.no_grad():
        logits = model(batch).logits
    model.save_pretrained(tmp_path / "peqa")
    after = load_file(tmp_path / "peqa" / "model.safetensors")
    assert set(after) == set(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and after[k].shape == v.shape, k
        if k.endswith(".qweight"):
            assert torch.equal(after[k], v), f"{k}: integer codes changed"
    changed = [k for k in before if k.endswith(".scales") and not torch.equal(after[k], before[k])]
    assert len(changed) == 14
    cfg = json.loads((tmp_path / "peqa" / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == 4 and cfg["group_size"] == -1 and cfg["symmetric"] is False
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "peqa")
    assert type(again.model.layers[0].mlp.up_proj) is QuantLinear
    with torch.no_grad():
        assert torch.equal(again(batch).logits, logits)


def test_scale_training_errors(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=1)
    with pytest.raises(ValueError, match="holds no QuantLinear"):
        hfquant.enable_scale_training(model)
    for cfg in (hfquant.HfQuantConfig(method="w8a8"), hfquant.HfQuantConfig(method="kmeans", bits=4)):
        seq = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
        hfquant.quantize_model(seq, cfg)
        with pytest.raises(ValueError, match="scale-only training does not support"):
            hfquant.enable_scale_training(seq)
    w8a8 = hfquant.quantize_model(copy.deepcopy(model), hfquant.HfQuantConfig(method="w8a8"))
    assert not w8a8.hf_quantizer.is_trainable


def _train_with_trainer(model, batch, tmp_path, lr):
    data = [{"input_ids": row, "labels": row} for row in batch]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=lr, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_hf_trainer_qat_then_convert(model_dir, batch, tmp_path):
    """The plain transformers Trainer on a prepare_qat model, then convert and save."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=2)
    hfquant.prepare_qat(model, hfquant.HfQuantConfig(bits=4, group_size=128))
    losses = _train_with_trainer(model, batch, tmp_path, 1e-4)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    hfquant.convert(model)
    model.save_pretrained(tmp_path / "qat")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "qat")
    model.eval()
    with torch.no_grad():
        assert torch.equal(again(batch).logits, model(batch).logits)


def test_hf_trainer_scale_training(quantized_dir, batch, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    # a quantized model without trainable scales or adapters: transformers refuses it
    with pytest.raises(ValueError, match="purely quantized"):
        _train_with_trainer(model, batch, tmp_path, 1e-3)
    hfquant.enable_scale_training(model)
    losses = _train_with_trainer(model, batch, tmp_path, 1e-3)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
