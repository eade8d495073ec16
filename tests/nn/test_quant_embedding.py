"""QuantEmbedding / TiedQuantLinear: quantized token embeddings and a tied lm_head sharing them."""
import json
import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hfquant
from hfquant.nn import QuantEmbedding, QuantLinear, TiedQuantLinear

SCHEMES = [(8, -1, True), (8, 64, False), (4, 128, True), (4, 32, False), (3, 64, False), (2, 32, True)]


@pytest.fixture(autouse=True)
def _weight_only():
    """Quantized models are compared with their dequantized float twins: the weight-only kernels
    (the int8 activations of the prefill default round the activations too)."""
    with hfquant.settings(int8_activations_min_m=None):
        yield


@pytest.mark.parametrize("bits,gs,sym", SCHEMES, ids=lambda v: str(v))
def test_lookup_matches_dequantized_table(bits, gs, sym):
    torch.manual_seed(0)
    emb = nn.Embedding(101, 160, padding_idx=3)
    q = QuantEmbedding.from_embedding(emb, bits, gs, sym)
    assert (q.num_embeddings, q.embedding_dim, q.padding_idx) == (101, 160, 3)
    table = q.dequantize_weight(torch.float32)
    ids = torch.randint(0, 101, (4, 9))
    assert torch.equal(q(ids), table[ids])
    # the RTN grid: each entry within half a step of the float table
    err = (table - emb.weight).abs().max()
    assert err <= q.scales.float().max() * 0.5 + 1e-6
    # the checkpoint tensors survive packing exactly
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    q2 = QuantEmbedding(101, 160, bits, gs, sym)
    q2.load_state_dict(sd)
    assert torch.equal(q2(ids), q(ids))
    back = q.to_embedding()
    assert isinstance(back, nn.Embedding) and torch.equal(back.weight, table)


def _tiny_llama(tie=True):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def test_tied_head_shares_the_quantized_table(tmp_path):
    model = _tiny_llama()
    x = torch.randint(0, 300, (2, 11))
    cfg = hfquant.HfQuantConfig(bits=4, group_size=32, quantize_embeddings=True,
                                modules_override={"embed_tokens": {"bits": 8}})
    hfquant.quantize_model(model, cfg)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and emb.bits == 8
    assert isinstance(head, TiedQuantLinear) and head.source is emb
    assert cfg.tied_modules == {"lm_head": "model.embed_tokens"}
    assert not model.config.tie_word_embeddings
    sd = model.state_dict()
    assert not any(k.startswith("lm_head.") for k in sd)  # one copy of the table
    # the head computes x @ E^T with E the dequantized table
    h = torch.randn(3, 64)
    want = h.double() @ emb.dequantize_weight(torch.float64).t()
    assert (head(h).double() - want).abs().max() <= 1e-4 * want.abs().max()
    with torch.no_grad():
        logits = model(x).logits
    model.save_pretrained(tmp_path)
    saved = json.load(open(os.path.join(tmp_path, "config.json")))["quantization_config"]
    assert saved["quantize_embeddings"] and saved["tied_modules"] == {"lm_head": "model.embed_tokens"}
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again.lm_head, TiedQuantLinear) and again.lm_head.source is again.model.embed_tokens
    with torch.no_grad():
        assert torch.equal(again(x).logits, logits)
    # dequantize: float embedding, lm_head tied to it again
    again.dequantize()
    assert isinstance(again.model.embed_tokens, nn.Embedding)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    with torch.no_grad():
        assert (again(x).logits - logits).abs().max() < 1e-3 * logits.abs().max()


def test_untied_model_quantizes_embedding_and_keeps_head_rule():
    model = _tiny_llama(tie=False)
    hfquant.quantize_model(model, hfquant.HfQuantConfig(bits=8, group_size=-1, quantize_embeddings=True))
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert type(model.lm_head) is nn.Linear  # lm_head is in modules_to_not_convert by default
    hfquant.quantize_model(m2 := _tiny_llama(tie=False), hfquant.HfQuantConfig(
        bits=8, group_size=-1, quantize_embeddings=True, modules_to_not_convert=[]))
    assert isinstance(m2.lm_head, QuantLinear)


def test_embedding_config_errors(tmp_path):
    with pytest.raises(ValueError, match="quantize_embeddings is supported with methods"):
        hfquant.HfQuantConfig(method="kmeans", quantize_embeddings=True)
    with pytest.raises(ValueError, match="quantize_embeddings must be True or False"):
        hfquant.HfQuantConfig(quantize_embeddings="yes")
    with pytest.raises(ValueError, match="tied_modules is set but quantize_embeddings is False"):
        hfquant.HfQuantConfig(tied_modules={"lm_head": "model.embed_tokens"})
    model = _tiny_llama()
    hfquant.quantize_model(model, hfquant.HfQuantConfig(bits=4, group_size=32, quantize_embeddings=True))
    model.save_pretrained(tmp_path)
    f = os.path.join(tmp_path, "config.json")
    cfg = json.load(open(f))
    cfg["quantization_config"]["tied_modules"] = {"lm_head": "model.nope"}
    json.dump(cfg, open(f, "w"))
    with pytest.raises(ValueError, match=r"tied_modules names modules the model does not have: lm_head -> model\.nope"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_quantize_on_load_with_embeddings_real_model(model_dir, tokenizer, tmp_path):
    """The default model (4 of its layers): embedding + tied lm_head at 8 bits, the rest W4."""
    cfg = hfquant.HfQuantConfig(bits=4, group_size=128, quantize_embeddings=True,
                                modules_override={"embed_tokens": {"bits": 8, "group_size": 64}})
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, num_hidden_layers=4)
    float_model = AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=4)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, TiedQuantLinear)
    x = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**x).logits
        ref = float_model(**x).logits
        # the 8-bit table: the input rows and the output projection agree with the float model closely
        emb_err = (model.model.embed_tokens(x.input_ids) - float_model.model.embed_tokens(x.input_ids)).abs().max()
    assert emb_err < 0.01 * float_model.model.embed_tokens.weight.abs().max()
    assert torch.equal(logits[0, -1].argmax(), ref[0, -1].argmax()) or \
        torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                   reduction="batchmean") < 0.5
    model.save_pretrained(tmp_path)
    size = sum(os.path.getsize(os.path.join(tmp_path, f)) for f in os.listdir(tmp_path))
    # the fp32 table alone is 113 MB; at 8 bits it is ~29 MB
    assert size < 40e6
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(**x).logits, logits)
    out = again.generate(**x, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == x.input_ids.shape[1] + 4


def test_default_below_8_bits_quantizes_embeddings_at_8(tmp_path):
    """quantize_embeddings left out with fewer than 8 bits: the embedding at 8 bits (an entry in
    modules_override, saved), the tied head sharing it; the checkpoint reloads the same; False,
    8 bits, a method without embeddings and a user's bits for the embedding are kept; a broken
    embedding tensor in the checkpoint is named at load."""
    model = _tiny_llama()
    cfg = hfquant.HfQuantConfig(bits=4, group_size=32)
    hfquant.quantize_model(model, cfg)
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and emb.bits == 8 and emb.group_size == 32
    assert isinstance(model.lm_head, TiedQuantLinear) and model.lm_head.source is emb
    assert all(m.bits == 4 for m in model.modules() if type(m) is QuantLinear)
    assert cfg.quantize_embeddings and cfg.modules_override == {"embed_tokens": {"bits": 8}}
    x = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        logits = model(x).logits
    model.save_pretrained(tmp_path / "q")
    saved = json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]
    assert saved["quantize_embeddings"] and saved["modules_override"] == {"embed_tokens": {"bits": 8}}
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.model.embed_tokens.bits == 8 and isinstance(again.lm_head, TiedQuantLinear)
    with torch.no_grad():
        assert torch.equal(again(x).logits, logits)
    # the same config object on a second model: its entries are made again, not kept from the first
    hfquant.quantize_model(_tiny_llama(), cfg)
    assert cfg.modules_override == {"embed_tokens": {"bits": 8}}
    for kw, want in ((dict(bits=4, group_size=32, quantize_embeddings=False), nn.Embedding),
                     (dict(bits=8, group_size=-1), nn.Embedding),
                     (dict(method="kmeans", bits=4), nn.Embedding)):
        m = hfquant.quantize_model(_tiny_llama(), hfquant.HfQuantConfig(**kw))
        assert type(m.model.embed_tokens) is want, kw
    m = hfquant.quantize_model(_tiny_llama(), hfquant.HfQuantConfig(
        bits=4, group_size=32, modules_override={"embed_tokens": {"bits": 4}}))
    assert m.model.embed_tokens.bits == 4
    # a user's entry without bits gets them beside its own settings
    cfg2 = hfquant.HfQuantConfig(bits=4, group_size=32, modules_override={"embed_tokens": {"group_size": 64}})
    m = hfquant.quantize_model(_tiny_llama(), cfg2)
    assert (m.model.embed_tokens.bits, m.model.embed_tokens.group_size) == (8, 64)
    assert cfg2.modules_override == {"embed_tokens": {"group_size": 64, "bits": 8}}
    # a checkpoint whose embedding scales were cut: the load names the tensor
    from safetensors.torch import load_file, save_file

    f = tmp_path / "q" / "model.safetensors"
    sd = load_file(f)
    sd["model.embed_tokens.scales"] = sd["model.embed_tokens.scales"][:, :1].contiguous()
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.scales has shape \(300, 1\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
