"""hfquant.evaluate.perplexity against an independent computation written the way the
transformers perplexity guide does it (model(input_ids, labels=...).loss, overlap labels -100),
on the real default model and WikiText-2, with disjoint and overlapping windows."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfquant import QuantizedKVCache
from hfquant.evaluate import perplexity, perplexity_with_cache

TOKENS = 768
WINDOW = 256
STRIDE = 128


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text(wikitext):
    return wikitext[:40000]  # well over TOKENS tokens


@torch.no_grad()
def guide_perplexity(model, encodings, max_length, stride):
    """The transformers perplexity guide's loop, verbatim in substance: the loss is the mean
    over the window's valid shifted labels, weighted back by their count."""
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        outputs = model(input_ids, labels=target_ids)
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)  # the model shifts labels left by one
        nll_sum += outputs.loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.fixture(scope="module")
def ours():
    return {}


@pytest.mark.parametrize("stride", [WINDOW, STRIDE])
def test_perplexity_matches_the_transformers_guide(model, tokenizer, text, ours, stride):
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :TOKENS]
    ref = guide_perplexity(model, ids, WINDOW, stride)
    ours[stride] = perplexity(model, tokenizer, text, max_length=WINDOW, stride=stride, max_tokens=TOKENS)
    assert abs(ours[stride] / ref - 1) < 1e-3, (ours[stride], ref)
    assert 10 < ours[stride] < 100  # a 135M model on WikiText-2


def test_overlap_gives_context_and_lowers_perplexity(model, tokenizer, text, ours):
    for stride in (WINDOW, STRIDE):
        if stride not in ours:
            ours[stride] = perplexity(model, tokenizer, text, max_length=WINDOW, stride=stride, max_tokens=TOKENS)
    assert ours[STRIDE] < ours[WINDOW]


def test_cache_in_the_loop_equals_plain_windows_and_quantized_cache_moves_it(model, tokenizer, text):
    kw = dict(max_length=WINDOW, stride=STRIDE, max_tokens=512)
    plain = perplexity(model, tokenizer, text, **kw)
    chunked = perplexity_with_cache(model, tokenizer, text, lambda: None, **kw)
    assert abs(chunked / plain - 1) < 1e-4, (chunked, plain)
    # residual_length 0: every token older than the current chunk is read back from 2-bit codes
    kv2 = perplexity_with_cache(model, tokenizer, text, lambda: QuantizedKVCache(model.config, 2, 64, 0), **kw)
    assert kv2 > plain * 1.001


@pytest.mark.parametrize("kw, msg", [(dict(stride=0), "stride=0"), (dict(stride=600), "stride=600"),
                                     (dict(max_length=1), "max_length=1")])
def test_bad_window_arguments_are_named(model, tokenizer, kw, msg):
    with pytest.raises(ValueError, match=msg):
        perplexity(model, tokenizer, "Some text to score here.", **kw)


def test_text_without_two_tokens_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, tokenizer, "", max_length=512)
