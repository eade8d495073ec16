"""Perplexity (sliding window), size on disk and in memory, prefill and decode speed."""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_length: int = 512, stride: int = 512,
               max_windows: int | None = None, max_tokens: int | None = None, progress: bool = False) -> float:
    """Sliding-window perplexity, the method of the transformers perplexity guide.

    Windows of ``max_length`` tokens start every ``stride`` tokens; each token is scored
    once, by the window that ends nearest after it (the overlap gives it context). With
    stride == max_length the windows are disjoint.
    """
    ids = tokenizer(text, return_tensors="pt").input_ids
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    seq_len = ids.shape[1]
    device = next(model.parameters()).device
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    starts = list(range(0, seq_len, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    for begin in tqdm(starts, desc="perplexity", disable=not progress):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end].to(device)
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        logits = model(input_ids).logits.float()
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
        n = int((shift_labels != -100).sum())
        nll_sum += float(loss)
        n_scored += n
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / max(n_scored, 1))


@torch.no_grad()
def perplexity_with_cache(model, tokenizer, text: str, make_cache, max_length: int = 512, chunk: int = 32,
                          max_windows: int | None = None, max_tokens: int | None = None,
                          progress: bool = False) -> float:
    """Perplexity where attention reads the cache: each disjoint window of ``max_length``
    tokens is fed in chunks of ``chunk`` tokens through a fresh cache from ``make_cache()``
    (None: the model's default cache), so every chunk attends to the past as the cache
    stores it (for a quantized cache: dequantized codes beyond its full-precision window),
    as it would while generating. Tokens within a chunk see each other in full precision.
    """
    if chunk < 1:
        raise ValueError(f"perplexity_with_cache: chunk={chunk} must be >= 1")
    ids = tokenizer(text, return_tensors="pt").input_ids
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    device = next(model.parameters()).device
    starts = list(range(0, ids.shape[1] - 1, max_length))
    if max_windows is not None:
        starts = starts[:max_windows]
    nll_sum, n_scored = 0.0, 0
    for begin in tqdm(starts, desc="perplexity (cache in the loop)", disable=not progress):
        window = ids[:, begin:begin + max_length].to(device)
        cache = make_cache()
        kwargs = {} if cache is None else {"cache": cache}
        logits = []
        for c0 in range(0, window.shape[1], chunk):
            out = model(window[:, c0:c0 + chunk], use_cache=True, **kwargs)
            kwargs = {"cache": (out["cache"] if "cache" in out else out.past_key_values) if cache is None else cache}
            logits.append(out.logits.float())
        logits = torch.cat(logits, dim=1)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        nll_sum += float(loss)
        n_scored += window.shape[1] - 1
    return math.exp(nll_sum / max(n_scored, 1))


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of the weight files (safetensors) of a checkpoint directory."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def _tensor_bytes(t: torch.Tensor) -> int:
    # Tensor subclasses of other libraries (packed int4, ...) hold their data in inner tensors.
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_bytes(model) -> int:
    """Bytes of parameters and buffers held by a model (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += _tensor_bytes(t)
    return total


def _prompt_ids(tokenizer, n_tokens: int):
    text = "The history of the city begins with a small settlement on the river. " * (n_tokens // 8 + 2)
    return tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]


@torch.no_grad()
def decode_speed(model, tokenizer, new_tokens: int = 64, prompt_tokens: int = 32, batch: int = 1,
                 repeats: int = 3) -> float:
    """Decode tokens/s (per sequence step x batch), prefill excluded, median of repeats."""
    ids = _prompt_ids(tokenizer, prompt_tokens).repeat(batch, 1)
    kw = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    prefill, full = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kw)
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        full.append(t2 - t1)
    # Decode time = (prefill + n tokens) - (prefill + 1 token), from the medians. When noise
    # makes that difference meaningless (short runs), count the whole run instead: a lower
    # bound on the rate rather than a wild figure.
    t_full, t_pre = statistics.median(full), statistics.median(prefill)
    decode = t_full - t_pre if t_full - t_pre > 0.1 * t_full else t_full
    return new_tokens * batch / decode


@torch.no_grad()
def prefill_speed(model, tokenizer, prompt_tokens: int = 512, repeats: int = 3) -> float:
    """Prompt tokens/s of one forward over a prompt, median of repeats."""
    ids = _prompt_ids(tokenizer, prompt_tokens)
    model(ids)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - t0)
    return ids.shape[1] / statistics.median(times)
