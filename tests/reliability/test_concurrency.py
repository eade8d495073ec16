"""Many threads running one quantized model at once compute exactly what one thread does,
including the first call of each layer (which derives its kernel layout once, under a
lock: repack at load)."""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfquant.nn import PackedLinear

THREADS = 6
ROUNDS = 2


def _inputs(n):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 1024, (1 + i % 3, 5 + 3 * i), generator=gen) for i in range(n)]


def _run_threads(fn, n):
    """fn(i) in n threads released together; returns the results in order, re-raising errors."""
    barrier = threading.Barrier(n)
    out, errors = [None] * n, []

    def work(i):
        try:
            barrier.wait()
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return out


def _unpack(model):
    """Back to the state right after loading a checkpoint: canonical tensors, no kernel layout."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for m in layers:
        m._apply(lambda t: t)  # a cast or move drops the kernel layout (PackedLinear._apply)
    assert layers and not any(m._packed for m in layers)
    return layers


@pytest.mark.parametrize("scheme", ["w4g128a", "kmeans", "llm_int8", "gptq"])
def test_threads_agree_with_one_thread_and_pack_once(checkpoints, scheme, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(checkpoints[scheme])
    inputs = _inputs(THREADS)
    with torch.no_grad():
        want = [model(ids).logits for ids in inputs]
    layers = _unpack(model)

    # count how often each layer derives its kernel layout while all threads hit it first
    packs = []
    cls = type(layers[0])
    real = cls._kernel_tensors
    monkeypatch.setattr(cls, "_kernel_tensors", lambda self: packs.append(id(self)) or real(self))

    def run(i):
        got = []
        with torch.no_grad():
            for r in range(ROUNDS):
                ids = inputs[(i + r) % THREADS]
                got.append((ids, model(ids).logits))
        return got

    for results in _run_threads(run, THREADS):
        for ids, logits in results:
            j = next(k for k, x in enumerate(inputs) if x is ids)
            assert torch.equal(logits, want[j])
    assert sorted(packs) == sorted(id(m) for m in layers)  # each layer packed exactly once
    assert all(m._packed and "qweight" not in m._buffers for m in layers)


def test_threads_generate_with_quantized_kv_cache(checkpoints):
    """generate (greedy, the quantized KV cache of each call its own) from 4 threads."""
    from hfquant.kv_cache import QuantizedKVCache

    model = AutoModelForCausalLM.from_pretrained(checkpoints["w4g128"])
    inputs = _inputs(4)

    def gen(ids):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=QuantizedKVCache(
                model.config, bits=4, residual_length=4), pad_token_id=0)

    want = [gen(ids) for ids in inputs]
    for i, got in enumerate(_run_threads(lambda i: gen(inputs[i]), 4)):
        assert torch.equal(got, want[i])
