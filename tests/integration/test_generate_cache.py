"""The cache generate gives a hfquant model (hfquant/generation.py): PreallocatedLayer against
transformers' DynamicLayer, op by op, and generate with it against transformers' own cache on
tiny models of several layer layouts and on the real default model."""
import random

import pytest
import torch
import transformers as T
from transformers import DynamicCache, EncoderDecoderCache, StaticCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import hfquant
from hfquant.generation import GROW_TOKENS, PreallocatedLayer, bind_generate_cache, generate_cache_bound
from hfquant.kv_cache import QuantizedKVCache

from _utils import save_tiny_llama

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024)


def _states(b, h, t, d, dtype=torch.float32):
    return torch.randn(b, h, t, d).to(dtype), torch.randn(b, h, t, d + 2).to(dtype)  # values may be wider


def _same(a: DynamicLayer, b: DynamicLayer):
    assert a.get_seq_length() == b.get_seq_length()
    if a.get_seq_length():
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preallocated_layer_matches_dynamic_layer(seed, dtype):
    """Random sequences of updates (prefill, single tokens, chunks), crops, beam reorders,
    batch selections and repeats, resets: the keys and values equal DynamicLayer's after every
    step; appends within capacity write in place."""
    rng = random.Random(seed)
    capacity = rng.choice([0, 1, 7, 40, 300])
    ref, new = DynamicLayer(), PreallocatedLayer(capacity)
    b, h, d = rng.choice([1, 3]), 2, 8
    views = True  # keys/values are the layer's own views of its buffers (after updates and crops)
    for _ in range(40):
        op = rng.choice(["update"] * 6 + ["crop", "reorder", "select", "repeat", "reset"])
        if op == "update":
            k, v = _states(b, h, rng.choice([1, 1, 1, 5, 33]), d, dtype)
            before = new._buffers[0] if new._buffers is not None and views else None
            past = new.get_seq_length()
            rk, rv = ref.update(k, v)
            nk, nv = new.update(k, v)
            assert torch.equal(nk, rk) and torch.equal(nv, rv) and nk.dtype == dtype
            kb = new._buffers[0]
            assert nk.data_ptr() == kb.data_ptr() and nk.shape[-2] <= kb.shape[-2]
            if before is not None and past and past + k.shape[-2] <= before.shape[-2]:
                assert kb is before  # appended in place: no new buffer
            views = True
        elif op == "reset":
            ref.reset()
            new.reset()
            views = True
            continue
        elif ref.get_seq_length() == 0:
            continue
        elif op == "crop":
            n = rng.randint(1, ref.get_seq_length())
            ref.crop(-n)
            new.crop(-n)
        elif op == "reorder":
            idx = torch.tensor([rng.randrange(b) for _ in range(b)])
            ref.reorder_cache(idx)
            new.reorder_cache(idx)
            views = False
        elif op == "select":
            idx = torch.tensor(sorted(rng.sample(range(b), rng.randint(1, b))))
            ref.batch_select_indices(idx)
            new.batch_select_indices(idx)
            b, views = len(idx), False
        else:
            ref.batch_repeat_interleave(2)
            new.batch_repeat_interleave(2)
            b, views = b * 2, False
        _same(ref, new)


def test_preallocated_layer_capacity_and_growth():
    layer = PreallocatedLayer(capacity=100)
    k, v = _states(1, 2, 60, 8)
    layer.update(k, v)
    assert layer._buffers[0].shape[-2] == 100  # the expected length, within half again of 60
    for _ in range(40):
        layer.update(*_states(1, 2, 1, 8))
    assert layer._buffers[0].shape[-2] == 100 and layer.get_seq_length() == 100
    layer.update(*_states(1, 2, 1, 8))  # past the expected length: grows by half (at least GROW_TOKENS)
    assert layer._buffers[0].shape[-2] == 101 + max(GROW_TOKENS, 101 // 2)
    big = PreallocatedLayer(capacity=100_000)  # a far-off expected length is not allocated up front
    big.update(*_states(1, 2, 10, 8))
    assert big._buffers[0].shape[-2] == 10 + GROW_TOKENS


def test_preallocated_layer_errors():
    for bad in (-1, 2.0, True, "8"):
        with pytest.raises(ValueError) as e:
            PreallocatedLayer(bad)
        assert str(e.value) == f"PreallocatedLayer: capacity must be an int >= 0, got {bad!r}"
    layer = PreallocatedLayer(10)
    layer.update(*_states(1, 2, 3, 8))
    with pytest.raises(ValueError) as e:
        layer.update(*_states(2, 2, 1, 8))
    assert str(e.value) == ("PreallocatedLayer: states of shape [2, 2, 1, 8] cannot be appended to a cache of shape "
                            "[1, 2, 3, 8] (only the token dimension, -2, may differ)")
    assert layer.get_seq_length() == 3  # nothing written


def _generate(model, ids, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, return_dict_in_generate=True,
                          output_logits=True, **kw)


def _both(model, ids, n, **kw):
    """n greedy tokens with transformers' cache and with the one hfquant gives: (ref, out)."""
    with hfquant.settings(generate_cache="transformers"):
        ref = _generate(model, ids, max_new_tokens=n, min_new_tokens=n, **kw)
    return ref, _generate(model, ids, max_new_tokens=n, min_new_tokens=n, **kw)


def _w8(cls, path):
    return cls.from_pretrained(path, quantization_config=hfquant.HfQuantConfig(bits=8, group_size=-1)).eval()


def _check_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_w4(tmp_path_factory):
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny"))
    return T.AutoModelForCausalLM.from_pretrained(path, quantization_config=hfquant.HfQuantConfig(
        bits=4, group_size=32)).eval()


def test_generate_uses_preallocated_layers_and_matches(tiny_w4):
    model = tiny_w4
    assert generate_cache_bound(model)
    ids = torch.randint(3, 256, (2, 21))
    ref, out = _both(model, ids, 30)
    assert all(type(layer) is DynamicLayer for layer in ref.cache.layers)
    assert type(out.cache) is DynamicCache and all(isinstance(layer, PreallocatedLayer) for layer in out.cache.layers)
    # room for generate's whole length (the last token is never cached), allocated once
    assert out.cache.layers[0]._buffers[0].shape[-2] == 21 + 30 - 1
    _check_same(ref, out)
    _check_same(*_both(model, ids, 30, num_beams=3))  # beam search reorders the layers every step


def test_generate_leaves_callers_choices_alone(tiny_w4):
    model = tiny_w4
    ids = torch.randint(3, 256, (1, 9))
    mine = DynamicCache(config=model.config)
    out = _generate(model, ids, max_new_tokens=4, cache=mine)
    assert out.cache is mine and all(type(layer) is DynamicLayer for layer in mine.layers)
    out = _generate(model, ids, max_new_tokens=4, cache_implementation="static")
    assert isinstance(out.cache, StaticCache)
    out = _generate(model, ids, max_new_tokens=4, use_cache=False)
    assert out.cache is None


def test_kv_cache_bits_is_generates_default_cache(tmp_path):
    path = save_tiny_llama(tmp_path / "tiny")
    cfg = hfquant.HfQuantConfig(bits=8, group_size=-1, kv_cache_bits=8, kv_cache_residual_length=8,
                                kv_cache_group_size=16)
    model = T.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg).eval()
    ids = torch.randint(3, 256, (1, 40))
    out = _generate(model, ids, max_new_tokens=5)
    assert isinstance(out.cache, QuantizedKVCache) and out.cache.layers[0]._qlen == 32
    explicit = _generate(model, ids, max_new_tokens=5, cache=hfquant.quantized_cache(model))
    _check_same(explicit, out)
    # the saved config brings it back: the reloaded model's generate is bound again
    model.save_pretrained(tmp_path / "q")
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert generate_cache_bound(again)
    _check_same(out, _generate(again, ids, max_new_tokens=5))


SLIDING = {
    "mistral_sliding": lambda: T.MistralConfig(num_hidden_layers=2, sliding_window=12, head_dim=16, **SMALL),
    "qwen2_alternating": lambda: T.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=12,
                                               max_window_layers=0,
                                               layer_types=["sliding_attention", "full_attention"] * 2, **SMALL),
}


@pytest.mark.parametrize("name", SLIDING)
def test_sliding_layers_stay_transformers_own(tmp_path, name):
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(SLIDING[name]()).save_pretrained(tmp_path)
    ref, out = _both(_w8(T.AutoModelForCausalLM, tmp_path), torch.randint(3, 256, (1, 30)), 20)
    kinds = [type(layer) for layer in out.cache.layers]
    assert kinds == [PreallocatedLayer if type(r) is DynamicLayer else DynamicSlidingWindowLayer
                     for r in ref.cache.layers]
    assert DynamicSlidingWindowLayer in kinds
    _check_same(ref, out)


def test_encoder_decoder_self_attention_preallocated(tmp_path):
    cfg = T.T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    T.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    ref, out = _both(_w8(T.T5ForConditionalGeneration, tmp_path), torch.randint(3, 256, (1, 17)), 12)
    assert isinstance(out.cache, EncoderDecoderCache)
    assert all(isinstance(layer, PreallocatedLayer) for layer in out.cache.self_attention_cache.layers)
    assert all(type(layer) is DynamicLayer for layer in out.cache.cross_attention_cache.layers)
    _check_same(ref, out)


def test_bind_refuses_what_it_cannot_bind():
    assert not bind_generate_cache(torch.nn.Linear(2, 2))  # no generate


def test_default_model_same_tokens_and_logits(model_dir, tokenizer, wikitext):
    """Real weights and text: W4 g128 default model, 320-token prompt, 24 greedy tokens."""
    model = T.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=hfquant.HfQuantConfig(
        bits=4, group_size=128)).eval()
    ref, out = _both(model, tokenizer(wikitext[:8000], return_tensors="pt").input_ids[:, :320], 24)
    assert isinstance(out.cache.layers[0], PreallocatedLayer)
    _check_same(ref, out)
