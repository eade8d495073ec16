"""LoRA through peft on a quantized (W4 per channel) 2-layer slice of the real default model:
with hfquant.register_lora on the LoraConfig, peft wraps the QuantLinear layers, training
lowers the loss, and the saved adapter reloads on top of the quantized checkpoint to identical
logits. Without it peft refuses QuantLinear targets (nothing in peft is patched)."""
import pytest
import torch
from _utils import train_losses
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.nn import QuantLinear

peft = pytest.importorskip("peft", reason="peft is installed by the Makefile; LoRA tests need it")


@pytest.fixture(scope="module")
def w4_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("w4c") / "model"
    cfg = hfquant.HfQuantConfig(bits=4, group_size=-1)
    AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=2, quantization_config=cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def batch(tokenizer):
    from hfquant.algorithms.calibration import calibration_batches

    return torch.cat(calibration_batches(tokenizer, None, n_samples=2, seq_len=48))


def test_lora_trains_saves_and_reloads(w4_dir, batch, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(w4_dir)
    assert base.hf_quantizer.is_trainable
    codes = {n: m._canonical_qweight().clone() for n, m in base.named_modules() if isinstance(m, QuantLinear)}
    model = get_peft_model(base, hfquant.register_lora(LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)))
    wrapped = [m for m in model.modules() if type(m).__name__ == "QuantLoraLinear"]
    assert len(wrapped) == 6 and all(isinstance(m.base_layer, QuantLinear) for m in wrapped)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = train_losses(model, opt, batch, 5)
    assert losses[-1] < losses[0] - 0.05, losses
    # adapters in the first layer train too: the gradient passed through the quantized layers above
    a0 = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert a0.abs().sum() > 0
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m._canonical_qweight(), codes[n.replace("base_model.model.", "").replace(
                ".base_layer", "")]), n
    model.eval()
    with torch.no_grad():
        logits = model(batch).logits
    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(w4_dir), tmp_path / "adapter",
                                      config=hfquant.register_lora(LoraConfig.from_pretrained(tmp_path / "adapter")))
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(batch).logits, logits)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        again.merge_and_unload()


@pytest.fixture(scope="module")
def tiny_w4(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=256)).save_pretrained(root / "float")
    cfg = hfquant.HfQuantConfig(bits=4, group_size=-1)
    AutoModelForCausalLM.from_pretrained(root / "float", quantization_config=cfg).save_pretrained(root / "w4")
    return root / "w4"


def test_without_register_lora_peft_refuses_quantlinear(tiny_w4):
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match=r"^Target module QuantLinear\(in_features=64, out_features=64, bias=False, "
                                         r"bits=4, per-channel, symmetric, grid=best\) is not supported\."):
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_w4), LoraConfig(r=4, target_modules=["q_proj"]))


def test_register_lora_refuses_other_configs():
    from peft import IA3Config

    with pytest.raises(ValueError, match=r"^hfquant: register_lora takes a peft LoraConfig, got IA3Config$"):
        hfquant.register_lora(IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"^hfquant: register_lora takes a peft LoraConfig, got dict$"):
        hfquant.register_lora({"r": 4})


def test_adapter_loads_through_transformers_load_adapter(tiny_w4, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    assert hfquant.register_lora(config) is config and hfquant.register_lora(config) is config
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_w4), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.randint(0, 256, (1, 12))
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(tiny_w4)
    with torch.no_grad():
        assert not torch.equal(plain(ids).logits, logits)
    plain.load_adapter(tmp_path / "adapter",
                       peft_config=hfquant.register_lora(LoraConfig.from_pretrained(tmp_path / "adapter")))
    assert type(plain.model.layers[1].self_attn.v_proj).__name__ == "QuantLoraLinear"
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, logits)
