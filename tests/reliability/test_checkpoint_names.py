"""Checkpoint names against the model: a base model's checkpoint under the same prefix rules
transformers uses, and a file whose names match nothing is refused by name (never skipped)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel

import hfquant
from hfquant.nn import QuantLinear


@pytest.fixture(scope="module")
def w4_dir(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("names")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    LlamaForCausalLM(cfg).save_pretrained(root / "float")
    model = AutoModelForCausalLM.from_pretrained(root / "float",
                                                 quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32))
    model.save_pretrained(root / "w4")
    return root / "w4", model


def test_base_model_from_a_causal_lm_checkpoint(w4_dir):
    path, full = w4_dir
    base = LlamaModel.from_pretrained(path)
    layer = base.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), full.model.layers[0].self_attn.q_proj(x))


def test_names_that_match_nothing_are_refused(w4_dir, tmp_path):
    path, _ = w4_dir
    out = tmp_path / "renamed"
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(out)
    sd = load_file(out / "model.safetensors")
    save_file({k.replace("model.", "transformer.", 1): v for k, v in sd.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"hfquant: the checkpoint's tensor names do not match the model built from "
                                         r"its config: 1 of 36 expected tensors found \(the model expects "
                                         r"model\.embed_tokens\.qweight; the file has transformer\."):
        AutoModelForCausalLM.from_pretrained(out)
