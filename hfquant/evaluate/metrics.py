"""Perplexity (sliding window), size on disk and in memory, prefill and decode speed."""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


def _windows(seq_len: int, max_length: int, stride: int, max_windows: int | None = None):
    """(begin, end, scored) of each sliding window, as in the transformers perplexity guide.

    Windows of ``max_length`` tokens start every ``stride`` tokens; a window scores its last
    ``scored`` tokens, those not scored by an earlier window, so each token after the first is
    scored exactly once and the rest of its window is context. The last window ends at the
    end of the text.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"perplexity: max_length={max_length!r} must be an integer >= 2")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise ValueError(f"perplexity: stride={stride!r} must be an integer in 1..max_length ({max_length})")
    if seq_len < 2:
        raise ValueError(f"perplexity: the text has {seq_len} token(s); at least 2 are needed to score one")
    prev_end = 0
    for i, begin in enumerate(range(0, seq_len, stride)):
        if max_windows is not None and i >= max_windows:
            break
        end = min(begin + max_length, seq_len)
        yield begin, end, end - prev_end
        prev_end = end
        if end == seq_len:
            break


def _window_nll(logits: torch.Tensor, window: torch.Tensor, scored: int) -> tuple[float, int]:
    """Summed negative log-likelihood of the last ``scored`` tokens of ``window`` (labels of the
    overlap masked with -100, the first token never scored) and the number of tokens scored."""
    labels = window.clone()
    labels[:, :-scored] = -100
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return float(loss), int((shift_labels != -100).sum())


def _ids(tokenizer, text: str, max_tokens: int | None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids if max_tokens is None else ids[:, :max_tokens]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_length: int = 512, stride: int = 512,
               max_windows: int | None = None, max_tokens: int | None = None, progress: bool = False) -> float:
    """Sliding-window perplexity, the method of the transformers perplexity guide.

    The text is tokenized once (cut to its first ``max_tokens`` tokens). Windows of
    ``max_length`` tokens start every ``stride`` tokens; each window is one forward pass and
    scores only the tokens no earlier window scored (its labels for the overlap are -100),
    so every token after the first is scored once, with up to ``max_length - stride`` tokens
    of extra context. stride == max_length: disjoint windows (fastest, least context);
    smaller strides give lower, more context-rich figures at max_length/stride times the cost.
    Perplexity = exp(summed NLL / tokens scored).
    """
    ids = _ids(tokenizer, text, max_tokens)
    device = next(model.parameters()).device
    nll_sum, n_scored = 0.0, 0
    wins = list(_windows(ids.shape[1], max_length, stride, max_windows))
    for begin, end, scored in tqdm(wins, desc="perplexity", disable=not progress):
        window = ids[:, begin:end].to(device)
        nll, n = _window_nll(model(window).logits, window, scored)
        nll_sum += nll
        n_scored += n
    return math.exp(nll_sum / max(n_scored, 1))


@torch.no_grad()
def perplexity_with_cache(model, tokenizer, text: str, make_cache, max_length: int = 512, chunk: int = 32,
                          max_windows: int | None = None, max_tokens: int | None = None,
                          progress: bool = False, stride: int | None = None) -> float:
    """Perplexity where attention reads the cache: the windows and scoring of
    :func:`perplexity` (``stride`` defaults to ``max_length``: disjoint windows), but each
    window is fed in chunks of ``chunk`` tokens through a fresh cache from ``make_cache()``
    (None: the model's default cache), so every chunk attends to the earlier tokens of its
    window as the cache stores them (for a quantized cache: dequantized codes beyond its
    full-precision window), as it would while generating. Tokens within a chunk see each
    other in full precision. With the default (full-precision) cache it equals
    :func:`perplexity` up to float rounding.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"perplexity_with_cache: chunk={chunk!r} must be an integer >= 1")
    ids = _ids(tokenizer, text, max_tokens)
    device = next(model.parameters()).device
    nll_sum, n_scored = 0.0, 0
    wins = list(_windows(ids.shape[1], max_length, max_length if stride is None else stride, max_windows))
    for begin, end, scored in tqdm(wins, desc="perplexity (cache in the loop)", disable=not progress):
        window = ids[:, begin:end].to(device)
        cache = make_cache()
        kwargs = {} if cache is None else {"cache": cache}
        logits = []
        for c0 in range(0, window.shape[1], chunk):
            out = model(window[:, c0:c0 + chunk], use_cache=True, **kwargs)
            kwargs = {"cache": (out["cache"] if "cache" in out else out.past_key_values) if cache is None else cache}
            logits.append(out.logits)
        nll, n = _window_nll(torch.cat(logits, dim=1), window, scored)
        nll_sum += nll
        n_scored += n
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


class _StepClock:
    """A stopping criterion that never stops: it records the time of every generation step."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def decode_speed(model, tokenizer, new_tokens: int = 64, prompt_tokens: int = 32, batch: int = 1,
                 repeats: int = 3, on_run=None, cache=None) -> float:
    """Decode tokens/s (sequence steps x batch), prefill excluded, median of repeats.

    Each repeat is one greedy ``generate`` of ``new_tokens + 1`` tokens; the clock runs from
    the end of the first step (prefill and first token) to the end of the last, so the rate
    covers ``new_tokens`` decode steps and no prefill. One short warm-up run precedes them.
    ``on_run(seconds)``, if given, is called with the wall time of each whole repeat.
    ``cache``, if given, makes the KV cache of each generate call (a fresh one each time).
    """
    from transformers import StoppingCriteriaList

    ids = _prompt_ids(tokenizer, prompt_tokens).repeat(batch, 1)
    kw = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id)
    fresh = (lambda: {"cache": cache()}) if cache is not None else dict
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw, **fresh())  # warm-up
    rates = []
    for _ in range(repeats):
        clock = _StepClock()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1,
                       stopping_criteria=StoppingCriteriaList([clock]), **kw, **fresh())
        if on_run is not None:
            on_run(time.perf_counter() - t0)
        steps = len(clock.times) - 1
        if steps < 1 or clock.times[-1] <= clock.times[0]:
            raise RuntimeError(f"decode_speed: generate made {len(clock.times)} step(s); cannot time decoding")
        rates.append(steps * batch / (clock.times[-1] - clock.times[0]))
    return statistics.median(rates)


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
