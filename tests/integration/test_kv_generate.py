"""QuantizedKVCache with generate on the real default model (SmolLM2-135M) and real text."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, pipeline

import hfquant
from hfquant import QuantizedKVCache
from hfquant.evaluate import perplexity_with_cache

PROMPT_TOKENS = 384  # long enough that 256 prompt tokens are quantized (residual 128)


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def prompt(tokenizer, wikitext):
    return tokenizer(wikitext[:20000], return_tensors="pt").input_ids[:, :PROMPT_TOKENS]


def _greedy(model, ids, cache, n=64, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, cache=cache, **kw)[:, ids.shape[1]:]


def test_int8_matches_fp_cache_and_int4_stays_close(model, prompt, tokenizer, wikitext):
    ref = _greedy(model, prompt, DynamicCache(config=model.config))
    cache = QuantizedKVCache(model.config, bits=8, group_size=64, residual_length=128)
    assert torch.equal(_greedy(model, prompt, cache), ref)
    # the cache really holds quantized tokens: 384 + 63 tokens, flushed in whole groups
    layer = cache.layers[0]
    assert layer._qlen == 256 and layer.keys.shape[-2] == PROMPT_TOKENS + 63 - 256
    assert cache.get_seq_length() == PROMPT_TOKENS + 63
    # int4: perplexity with attention reading the quantized past, one 512-token window
    fp = perplexity_with_cache(model, tokenizer, wikitext, lambda: None, max_windows=1)
    q4 = perplexity_with_cache(model, tokenizer, wikitext,
                               lambda: QuantizedKVCache(model.config, 4, 64, 128), max_windows=1)
    assert abs(q4 / fp - 1) < 0.01


def test_memory_per_token(model, prompt):
    cache = QuantizedKVCache(model.config, bits=4, group_size=64, residual_length=0)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
    # 30 layers x 3 kv heads x (K + V): 32 B of codes + 4 B of fp16 params per token each
    per_token = cache.memory_bytes() / PROMPT_TOKENS
    assert per_token == 30 * 3 * 2 * (32 + 4)
    bf16 = 30 * 3 * 2 * 64 * 2
    assert per_token / bf16 <= 0.3
    assert cache.memory_bytes(allocated=True) >= cache.memory_bytes()


def test_beam_search_and_sampling(model, prompt):
    ids = prompt[:, :200]
    fp = model.generate(ids, max_new_tokens=16, num_beams=3, do_sample=False, cache=DynamicCache(config=model.config))
    q8 = model.generate(ids, max_new_tokens=16, num_beams=3, do_sample=False,
                        cache=QuantizedKVCache(model.config, 8, 32, 64))
    assert torch.equal(fp, q8)
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=16, do_sample=True, top_k=20,
                         cache=QuantizedKVCache(model.config, 4, 32, 64))
    assert out.shape == (1, 216)


def test_batch_with_padding(model, tokenizer, wikitext):
    tok = copy.deepcopy(tokenizer)  # the session's tokenizer stays as it is
    tok.padding_side, tok.pad_token = "left", "<|endoftext|>"
    texts = [wikitext[:1500], wikitext[3000:3600]]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()
    fp = model.generate(**batch, max_new_tokens=24, do_sample=False, cache=DynamicCache(config=model.config),
                        pad_token_id=tok.pad_token_id)
    q8 = model.generate(**batch, max_new_tokens=24, do_sample=False, cache=QuantizedKVCache(model.config, 8, 32, 64),
                        pad_token_id=tok.pad_token_id)
    assert torch.equal(fp, q8)


def test_config_kv_cache_bits_used_by_generate_and_pipeline(model_dir, tokenizer, tmp_path, monkeypatch):
    """The KV cache settings saved in the config reach generate and pipelines through
    hfquant.quantized_cache(model), an explicit call (nothing is bound to the model)."""
    cfg = hfquant.HfQuantConfig(bits=8, group_size=-1, kv_cache_bits=4, kv_cache_group_size=32,
                                kv_cache_residual_length=16)
    q = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg)
    q.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    made = []
    orig = QuantizedKVCache.__init__

    def spy(self, *a, **k):
        made.append(a[1:] or tuple(k.values()))
        orig(self, *a, **k)

    monkeypatch.setattr(QuantizedKVCache, "__init__", spy)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    again.generate(**ids, max_new_tokens=4, do_sample=False, cache=hfquant.quantized_cache(again))
    text = pipeline("text-generation", model=again, tokenizer=tokenizer)(
        "The capital of France is", max_new_tokens=4, do_sample=False,
        cache=hfquant.quantized_cache(again))[0]["generated_text"]
    assert "Paris" in text
    assert made and made[0] == (4, 32, 16) and made[1] == (4, 32, 16)
    # nothing is bound: without the call generate uses transformers' own cache
    made.clear()
    again.generate(**ids, max_new_tokens=2)
    again.generate(**ids, max_new_tokens=2, cache=DynamicCache(config=again.config))
    assert not made
    assert "generate" not in vars(again) and "save_pretrained" not in vars(again)
    # a float model's config asks for no quantized cache
    assert hfquant.quantized_cache(AutoModelForCausalLM.from_pretrained(model_dir)) is None


def test_bad_arguments(model):
    for kwargs, match in [(dict(bits=3), "bits=3"), (dict(bits=4, group_size=48), "does not divide head_dim=64"),
                          (dict(bits=4, group_size=0), "group_size"), (dict(residual_length=-1), "residual_length")]:
        with pytest.raises(ValueError, match=match):
            QuantizedKVCache(model.config, **kwargs)
    with pytest.raises(ValueError, match="kv_cache_bits.*bits=5"):
        hfquant.HfQuantConfig(kv_cache_bits=5)


def test_sliding_model_served():
    """Gemma2's alternating sliding/full layers get sliding and full quantized layers
    (tests/integration/test_kv_layer_types.py checks every layer type)."""
    from transformers import Gemma2Config

    cfg = Gemma2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=32, intermediate_size=128, vocab_size=100, sliding_window=64)
    cache = QuantizedKVCache(cfg, bits=4, group_size=32)
    assert [layer.sliding_window for layer in cache.layers] == [64, None]
