"""QuantizedKVCache on every layer type transformers builds (tiny random models, CPU): full,
sliding and chunked attention, linear-attention / mamba state, hybrid layers, encoder-decoder.
The int8 cache is compared to transformers' DynamicCache on the same model."""
import logging

import pytest
import torch
import transformers as T
from transformers import DynamicCache, EncoderDecoderCache
from transformers.cache_utils import DynamicSlidingWindowLayer, LinearAttentionLayer

import hfquant
from hfquant.kv_cache import QuantizedHybridKVLayer, QuantizedKVCache, QuantizedKVLayer, default_group_size

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024)
WINDOW = 40
ALTERNATING = ["sliding_attention", "full_attention"] * 2

# name -> (config, the cache's layer classes: "full", "sliding", "linear", "hybrid")
CONFIGS = {
    "mistral_sliding": (lambda: T.MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, head_dim=16, **SMALL),
                        ["sliding"] * 2),
    "qwen2_alternating": (lambda: T.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=WINDOW,
                                                max_window_layers=0, layer_types=ALTERNATING, **SMALL),
                          ["sliding", "full"] * 2),
    "gemma3": (lambda: T.Gemma3TextConfig(num_hidden_layers=4, sliding_window=WINDOW, head_dim=16,
                                          layer_types=ALTERNATING, **SMALL), ["sliding", "full"] * 2),
    "llama4_chunked": (lambda: T.Llama4TextConfig(num_hidden_layers=2, head_dim=16, attention_chunk_size=WINDOW,
                                                  layer_types=["chunked_attention", "full_attention"],
                                                  num_local_experts=2, intermediate_size_mlp=128, **SMALL),
                       ["sliding", "full"]),
    "gpt_oss": (lambda: T.GptOssConfig(num_hidden_layers=2, sliding_window=WINDOW, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, layer_types=ALTERNATING[:2], **SMALL),
                ["sliding", "full"]),
    "falcon_h1": (lambda: T.FalconH1Config(num_hidden_layers=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4,
                                           mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16,
                                           **SMALL), ["hybrid"] * 2),
    "qwen3_next": (lambda: T.Qwen3NextConfig(num_hidden_layers=2, head_dim=16,
                                             layer_types=["linear_attention", "full_attention"],
                                             linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                                             linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=32, shared_expert_intermediate_size=32, **SMALL),
                   ["linear", "full"]),
    "phi3_head_dim_96": (lambda: T.Phi3Config(num_hidden_layers=2, vocab_size=256, hidden_size=192,
                                              intermediate_size=128, num_attention_heads=2, num_key_value_heads=2,
                                              pad_token_id=0, eos_token_id=1, bos_token_id=2),
                         ["full"] * 2),
}


def _kind(layer) -> str:
    if isinstance(layer, QuantizedHybridKVLayer):
        return "hybrid"
    if isinstance(layer, QuantizedKVLayer):
        return "sliding" if layer.is_sliding else "full"
    return "linear" if isinstance(layer, LinearAttentionLayer) else type(layer).__name__


def _bound(layer) -> int:
    """The most tokens a sliding layer may hold: window + residual + one group."""
    return layer.sliding_window + layer.residual_length + layer.group_size


def _tiny(name):
    """(a random model of CONFIGS[name], a 100-token prompt, generate's arguments for 30 greedy tokens)."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[name][0]()).eval()
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, return_dict_in_generate=True,
              output_logits=True, pad_token_id=0)
    return model, torch.randint(3, 256, (1, 100)), kw


@pytest.mark.parametrize("name", list(CONFIGS))
def test_int8_cache_matches_fp_cache(name):
    kinds = CONFIGS[name][1]
    model, ids, kw = _tiny(name)
    ref = model.generate(ids, cache=DynamicCache(config=model.config), **kw)
    cache = QuantizedKVCache(model.config, bits=8, residual_length=8)
    out = model.generate(ids, cache=cache, **kw)
    assert [_kind(layer) for layer in cache.layers] == kinds
    assert cache.group_size == (32 if name == "phi3_head_dim_96" else 16)  # the largest of 64/32/16/8 dividing it
    assert torch.equal(out.sequences, ref.sequences)
    a, b = torch.stack(ref.logits), torch.stack(out.logits)
    assert ((a - b).norm() / a.norm()).item() < 5e-3  # int8 keys/values: ~1e-3 on these models
    for layer in cache.layers:
        if isinstance(layer, QuantizedKVLayer):
            assert layer._qlen > 0  # the past really went through the quantized store
            assert layer.get_seq_length() == 129
            if layer.is_sliding:
                assert layer.stored_tokens() <= _bound(layer) and layer.get_max_length() == WINDOW


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "phi3_head_dim_96"])
def test_rotated_reads_match_rotating_back(name):
    """A model running hfquant's rotated attention gets the rotated cache's states as stored
    (the query and the output rotated instead of every stored token): the same generation as
    rotating the cache back, to float rounding, on every layer layout (sliding, hybrid, ...)."""
    from hfquant.attention import ROTATED_SDPA, enable_rotated_attention

    model, ids, kw = _tiny(name)
    back = QuantizedKVCache(model.config, bits=4, residual_length=8, rotation="hadamard")
    ref = model.generate(ids, cache=back, **kw)
    assert not back.rotated_reads
    if model.config._attn_implementation != "sdpa":  # gpt-oss runs eager attention (sinks): left as it is
        assert not enable_rotated_attention(model) and model.config._attn_implementation == "eager"
        assert not QuantizedKVCache(model.config, bits=4, rotation="hadamard").rotated_reads
        return
    assert enable_rotated_attention(model) and model.config._attn_implementation == ROTATED_SDPA
    cache = QuantizedKVCache(model.config, bits=4, residual_length=8, rotation="hadamard")
    assert cache.rotated_reads
    out = model.generate(ids, cache=cache, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    a, b = torch.stack(ref.logits), torch.stack(out.logits)
    assert ((a - b).norm() / a.norm()).item() < 1e-4
    for layer in cache.layers:
        if isinstance(layer, QuantizedKVLayer):
            assert layer.rotated_reads and layer._qlen > 0
    # an unrotated cache through the rotated attention is plain sdpa
    plain = model.generate(ids, cache=DynamicCache(config=model.config), **kw)
    model.set_attn_implementation("sdpa")
    again = model.generate(ids, cache=DynamicCache(config=model.config), **kw)
    assert torch.equal(plain.sequences, again.sequences)
    assert torch.equal(torch.stack(plain.logits), torch.stack(again.logits))
    # a cache made for the rotated attention refuses a model switched away from it
    with pytest.raises(ValueError) as e:
        model.generate(ids, cache=cache, max_new_tokens=2)
    assert str(e.value) == ("QuantizedKVCache: this cache hands rotated states to hfquant_rotated_sdpa attention, "
                            "but the model now runs 'sdpa': make a new cache after changing the attention "
                            "implementation")


def _feed(layers, chunks, D=16, heads=2, seed=0):
    """Feeds the same random keys/values in chunks to each layer; yields (t, past, outputs)."""
    g = torch.Generator().manual_seed(seed)
    past = 0
    for t in chunks:
        k = torch.randn(1, heads, t, D, generator=g)
        v = torch.randn(1, heads, t, D, generator=g)
        yield t, past, [(layer.get_mask_sizes(t), layer.update(k, v)) for layer in layers]
        past += t


@pytest.mark.parametrize("residual", [8, 64])  # a window shorter and longer than the residual
def test_sliding_layer_returns_the_full_layers_window(residual):
    """The sliding layer's keys/values are exactly the full layer's last tokens, as many as
    transformers' DynamicSlidingWindowLayer returns, and its mask sizes are that layer's."""
    sliding = QuantizedKVLayer(4, 16, residual, sliding_window=WINDOW)
    full = QuantizedKVLayer(4, 16, residual)
    fp = DynamicSlidingWindowLayer(sliding_window=WINDOW)
    chunks = [100, 1, 1, 7, 33, 1, 16, 1, 300] + [1] * 40
    for t, past, [(sizes, (ks, vs)), (_, (kf, vf)), (fp_sizes, (kd, _))] in _feed([sliding, full, fp], chunks):
        assert sizes == fp_sizes and ks.shape == kd.shape and ks.shape[-2] == sizes[0]
        n = ks.shape[-2]
        assert n == min(past, WINDOW - 1) + t
        assert torch.equal(ks, kf[..., -n:, :]) and torch.equal(vs, vf[..., -n:, :])
        assert sliding.stored_tokens() <= _bound(sliding)
        assert sliding.get_seq_length() == full.get_seq_length() == past + t


def test_sliding_layer_memory_bounded_at_8k_tokens():
    layer = QuantizedKVLayer(4, 64, 128, sliding_window=256)
    fp32_token = 2 * 2 * 64 * 4  # bytes of one token's keys and values, 2 heads, float32
    for _, _, _ in _feed([layer], [8192] + [1] * 200 + [64] * 10, D=64):
        assert layer.stored_tokens() <= 256 + 128 + 64 and layer._qlen <= 256 + 64
        # what is allocated, stores and window, stays below that many float tokens
        assert layer.memory_bytes(allocated=True) <= (256 + 128 + 64) * fp32_token
    assert layer.get_seq_length() == 8192 + 200 + 640


def test_multimodal_config_uses_the_text_layers():
    cfg = T.Gemma3Config(text_config=dict(num_hidden_layers=6, hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          sliding_window=WINDOW, vocab_size=300),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=28, patch_size=14))
    cache = QuantizedKVCache(cfg, bits=4)
    assert [layer.sliding_window for layer in cache.layers] == [WINDOW] * 5 + [None]
    assert cache.group_size == 16


def test_encoder_decoder_gets_encoder_decoder_cache():
    cfg = T.T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 256, (1, 50))
    kw = dict(max_new_tokens=60, min_new_tokens=60, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    ref = model.generate(ids, **kw)
    model.config.quantization_config = {"quant_method": "hfquant", "kv_cache_bits": 8,
                                        "kv_cache_residual_length": 8}
    cache = hfquant.quantized_cache(model)
    assert isinstance(cache, EncoderDecoderCache)
    assert isinstance(cache.self_attention_cache, QuantizedKVCache)
    assert isinstance(cache.cross_attention_cache, DynamicCache)
    out = model.generate(ids, cache=cache, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    a, b = torch.stack(ref.logits), torch.stack(out.logits)
    assert ((a - b).norm() / a.norm()).item() < 5e-3
    assert cache.self_attention_cache.layers[0]._qlen == 48  # 60 decoder tokens, residual 8, groups of 16
    # alone, its cross-attention keys/values would be appended to the self-attention layers
    with pytest.raises(ValueError) as e:
        model.generate(ids, max_new_tokens=2, cache=QuantizedKVCache(model.config, bits=8))
    assert str(e.value) == ("QuantizedKVCache: a t5 model is an encoder-decoder: pass hfquant.quantized_cache(model) "
                            "or QuantizedKVCache.for_encoder_decoder(config, ...) (an EncoderDecoderCache), not a "
                            "QuantizedKVCache alone")


def test_default_group_size_and_errors_name_the_option():
    assert [default_group_size(d) for d in (256, 128, 96, 80, 72, 64, 32)] == [64, 64, 32, 16, 8, 64, 32]
    with pytest.raises(ValueError) as e:
        default_group_size(100)
    assert str(e.value) == ("QuantizedKVCache: no default group size divides head_dim=100 (the default is the largest "
                            "of (64, 32, 16, 8) dividing it); set kv_cache_group_size (group_size) to a divisor of "
                            "head_dim")
    phi3 = CONFIGS["phi3_head_dim_96"][0]()
    with pytest.raises(ValueError) as e:
        QuantizedKVCache(phi3, bits=4, group_size=64)
    assert str(e.value) == ("QuantizedKVCache: group_size=64 (kv_cache_group_size) does not divide head_dim=96; "
                            "leave kv_cache_group_size unset for the largest of (64, 32, 16, 8) dividing head_dim, "
                            "or use a divisor of it")


def test_unserved_layer_type_named():
    cfg = T.LlamaConfig(num_hidden_layers=2, **SMALL)
    cfg.layer_types = ["full_attention", "indexed_attention"]
    with pytest.raises(ValueError) as e:
        QuantizedKVCache(cfg, bits=4)
    assert str(e.value) == ("QuantizedKVCache: a llama model cannot use it (layer 1 is 'indexed_attention'; it serves "
                            "full_attention, sliding_attention, chunked_attention, linear_attention, conv, hybrid, "
                            "hybrid_sliding, dummy)")


def _save_tiny(path, config):
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_kv_cache_bits_never_fails_a_load(tmp_path, caplog):
    """A cache the model cannot use is a warning at load; quantized_cache then gives None
    (generate uses its default cache). Phi3's head_dim 96 takes the default group size 32."""
    phi3 = _save_tiny(tmp_path / "phi3", CONFIGS["phi3_head_dim_96"][0]())
    q = T.AutoModelForCausalLM.from_pretrained(phi3, quantization_config=hfquant.HfQuantConfig(
        bits=8, group_size=-1, kv_cache_bits=4))
    cache = hfquant.quantized_cache(q)
    assert isinstance(cache, QuantizedKVCache) and cache.group_size == 32
    q.save_pretrained(tmp_path / "q")
    assert hfquant.quantized_cache(T.AutoModelForCausalLM.from_pretrained(tmp_path / "q")).group_size == 32

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hfquant"):
        q = T.AutoModelForCausalLM.from_pretrained(phi3, quantization_config=hfquant.HfQuantConfig(
            bits=8, group_size=-1, kv_cache_bits=4, kv_cache_group_size=64))
        assert hfquant.quantized_cache(q) is None
    msgs = [r.getMessage() for r in caplog.records if r.name == "hfquant"]
    expected = ("hfquant: kv_cache_bits=4 is not used for this phi3 model, generate keeps transformers' default "
                "cache: QuantizedKVCache: group_size=64 (kv_cache_group_size) does not divide head_dim=96; leave "
                "kv_cache_group_size unset for the largest of (64, 32, 16, 8) dividing head_dim, or use a divisor "
                "of it")
    assert msgs == [expected, expected]  # at load, and when generate's cache is asked for
    out = q.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, cache=hfquant.quantized_cache(q))
    assert out.shape == (1, 6)
