"""accelerate offload: device_map="auto" with a tight max_memory puts decoder blocks of the
default model (W4 g128; its first 8 blocks, to keep the test short) on disk; their quantized tensors stay there between calls and the
outputs are bit-identical to the model held in memory."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.nn import QuantLinear


@pytest.fixture(scope="module")
def w4(model_dir, tokenizer, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("w4") / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=8,
                                                 quantization_config=hfquant.HfQuantConfig(
                                                     bits=4, quantize_embeddings=False))  # sized for a float embedding
    model.save_pretrained(out)
    return model, out


def _disk_layers(model):
    return [n for n, d in model.hf_device_map.items() if d == "disk" and n.startswith("model.layers.")]


@pytest.mark.parametrize("offload_buffers", [True, False])
def test_disk_offload(w4, tokenizer, wikitext, tmp_path, offload_buffers, caplog):
    model, path = w4
    # 120 MB of CPU memory: the embedding (113 MB) and the first blocks; the rest goes to disk
    off = AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory={"cpu": "120MB"},
                                               offload_folder=str(tmp_path / "offload"),
                                               offload_buffers=offload_buffers)
    disk = _disk_layers(off)
    assert len(disk) >= 4, off.hf_device_map
    q = off.get_submodule(disk[-1]).mlp.down_proj
    assert isinstance(q, QuantLinear)
    ids = tokenizer(wikitext[:2000], return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        want = model(ids).logits
        got = off(ids).logits
    assert torch.equal(got, want)
    if offload_buffers:
        # the codes and scales are read from disk for each call and dropped after it
        assert q._offloaded() and q.qweight.device.type == "meta" and q.scales.device.type == "meta"
        assert not hasattr(q, "packed_weight")
    else:
        assert not q._offloaded() and q._packed  # buffers stay in memory: packed once
        assert "offload_buffers=True" in caplog.text
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(off.generate(**prompt, **kw), model.generate(**prompt, **kw))
