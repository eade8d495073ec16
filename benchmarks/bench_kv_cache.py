"""Quantized KV cache: quality, memory and decode speed against the full-precision cache and
transformers' own quantized cache (optimum-quanto backend, when installed), in one process.

* perplexity with the cache in the loop (hfquant.evaluate.perplexity_with_cache: windows of
  512 tokens fed in chunks of 32, so attention reads the past as the cache stores it);
* greedy agreement: share of 64 greedy tokens equal to the full-precision cache's, after
  prompts long enough (384 tokens) that most of the past is quantized, over several prompts
  (one prompt says little: a near tie flips at the smallest perturbation);
* cache bytes per token at the longest context (scales and the residual window included);
* decode tokens/s at several contexts: each cache is prefilled once, then every repetition
  decodes --new-tokens more tokens greedily into it (the context grows by that much per
  repetition; transformers' quantized cache cannot be copied); kinds interleaved, medians.

    python benchmarks/bench_kv_cache.py                      # contexts 512 2048 8192
    python benchmarks/bench_kv_cache.py --quick              # smoke run
    python benchmarks/bench_kv_cache.py --write-docs
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

from hfquant import QuantizedKVCache, data  # noqa: E402
from hfquant.attention import enable_rotated_attention  # noqa: E402
from hfquant.generation import _preallocate  # noqa: E402
from hfquant.evaluate import perplexity_with_cache  # noqa: E402

DOC_INTRO = "# Benchmarks\n"


def kinds(config, residual: int) -> dict[str, callable]:
    """name -> factory of a fresh cache (None = transformers' DynamicCache)."""
    out = {"fp (DynamicCache)": lambda: DynamicCache(config=config),
           "fp (preallocated: generate's default)": lambda: _preallocate(DynamicCache(config=config), 0)}
    # the default rotation ("auto": rotated at 4 bits) and the other choice where it is informative
    for bits, g, rot in ((8, 64, "auto"), (4, 64, "auto"), (4, 64, None), (4, 32, "auto"), (2, 32, "auto"),
                         (2, 32, "hadamard"), (2, 16, "auto")):
        make = (lambda b=bits, g=g, rot=rot: QuantizedKVCache(config, bits=b, group_size=g, residual_length=residual,
                                                               rotation=rot))
        rotated = make().rotation == "hadamard"
        label = (" rotated" if rotated else " unrotated") + (" (default)" if rot == "auto" else "")
        out[f"hfquant int{bits} g{g}{label}"] = make
    try:
        import optimum.quanto  # noqa: F401
        from transformers.cache_utils import QuantizedCache

        for bits in (4, 2):
            out[f"quanto int{bits} g64"] = (lambda b=bits: QuantizedCache("quanto", config, nbits=b, q_group_size=64,
                                                                          residual_length=residual))
    except Exception as exc:  # peer missing: reported, not fatal
        print(f"quanto cache unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
    return out


def cache_bytes(cache) -> int | None:
    if isinstance(cache, QuantizedKVCache):
        return cache.memory_bytes()
    if isinstance(cache, DynamicCache) and type(cache) is DynamicCache:  # the tokens held (not spare capacity)
        return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                   for layer in cache.layers if layer.is_initialized)
    return None


@torch.no_grad()
def prefill(model, ids, cache):
    out = model(ids, cache=cache, use_cache=True)
    return out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(model, cache, token, n: int) -> list[int]:
    toks = []
    for _ in range(n):
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        toks.append(int(token))
    return toks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", nargs="+", type=int, default=None, help="default 512 2048 8192 (quick: 512 1024)")
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per timing (default 32, quick 8)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per kind (default 5, quick 2)")
    p.add_argument("--windows", type=int, default=None, help="perplexity windows of 512 (default 8, quick 2)")
    p.add_argument("--prompts", type=int, default=None, help="greedy-agreement prompts (default 8, quick 2)")
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    a = p.parse_args(argv)
    a.contexts = a.contexts or ([512, 1024] if a.quick else [512, 2048, 8192])
    a.new_tokens = a.new_tokens or (8 if a.quick else 32)
    a.reps = a.reps or (2 if a.quick else 5)
    a.windows = a.windows or (2 if a.quick else 8)
    a.prompts = a.prompts or (2 if a.quick else 8)
    command = common.command_line(__file__, argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    md = str(data.default_model_dir("float32"))
    tok = AutoTokenizer.from_pretrained(md)
    model = AutoModelForCausalLM.from_pretrained(md).eval()
    # as a hfquant model with kv_cache_bits runs: rotated caches are read as stored
    assert enable_rotated_attention(model)
    text = data.wikitext_test()
    ks = kinds(model.config, a.residual)

    # quality
    rows = []
    all_ids = tok(text, return_tensors="pt").input_ids
    # prompts of 384 tokens from spread-out places of the text (most of each is quantized)
    step = (all_ids.shape[1] - 384) // a.prompts
    prompts = [all_ids[:, i * step:i * step + 384] for i in range(a.prompts)]
    ref_tokens: list[list[int]] = []
    for name, make in ks.items():
        ppl = perplexity_with_cache(model, tok, text, make, max_windows=a.windows)
        agree, first = [], []
        for i, prompt in enumerate(prompts):
            cache = make()
            toks = decode(model, cache, prefill(model, prompt, cache), 64)
            if len(ref_tokens) < len(prompts):
                ref_tokens.append(toks)
            agree.append(sum(x == y for x, y in zip(toks, ref_tokens[i])) / len(toks))
            first.append(next((j for j, (x, y) in enumerate(zip(toks, ref_tokens[i])) if x != y), 64))
        rows.append({"kind": name, "ppl": ppl, "agree": statistics.mean(agree),
                     "first_diff": statistics.median(first), "identical": sum(f == 64 for f in first)})
        print(f"{name}: ppl {ppl:.3f}, greedy agreement {statistics.mean(agree):.0%}", file=sys.stderr, flush=True)
    base_ppl = rows[0]["ppl"]

    # speed (and memory at each context)
    ids = all_ids
    speed: dict[tuple[str, int], float] = {}
    mem: dict[tuple[str, int], float] = {}
    for L in a.contexts:
        prefilled = {}
        for name, make in ks.items():
            cache = make()
            first = prefill(model, ids[:, :L], cache)
            prefilled[name] = (cache, first)
            b = cache_bytes(cache)
            if b is not None:
                mem[(name, L)] = b / L
        samples: dict[str, list[float]] = {n: [] for n in ks}
        for r in range(a.reps + 1):  # round 0 is a warm-up
            order = list(ks)[r % len(ks):] + list(ks)[:r % len(ks)]
            for name in order:
                cache, first = prefilled[name]
                t0 = time.perf_counter()
                decode(model, cache, first, a.new_tokens)
                if r:
                    samples[name].append(a.new_tokens / (time.perf_counter() - t0))
        for name in ks:
            speed[(name, L)] = statistics.median(samples[name])
        print(f"context {L}: " + ", ".join(f"{n} {speed[(n, L)]:.1f}" for n in ks), file=sys.stderr, flush=True)

    info = common.system_info(a.threads)
    fp = "fp (DynamicCache)"
    Lmax = max(a.contexts)
    table = []
    for r in rows:
        n = r["kind"]
        cells = [n, f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / base_ppl - 1):+.2f}%",
                 f"{r['agree']:.0%}, median first difference at token {r['first_diff']:g}, "
                 f"{r['identical']}/{a.prompts} identical"]
        b = mem.get((n, Lmax))
        bf16 = mem[(fp, Lmax)] * 2 / 4 if (fp, Lmax) in mem else float("nan")  # fp32 cache -> bf16
        cells.append(f"{b:.0f} ({b / bf16:.2f}x bf16)" if b is not None else "n/a")
        for L in a.contexts:
            cells.append(f"{speed[(n, L)]:.1f} ({speed[(n, L)] / speed[(fp, L)]:.2f}x)")
        table.append(cells)
    header = ["cache", "perplexity", "vs fp", f"greedy agreement (64 tokens, {a.prompts} prompts)", f"bytes/token at {Lmax}",
              *[f"decode tok/s @ {L}" for L in a.contexts]]
    body = "\n".join([
        "### Quantized KV cache" + (" (PLACEHOLDER: --quick smoke run)" if a.quick else ""), "",
        f"Command: `{command}`", "", common.header_line(info) + ".", "",
        f"Default model (SmolLM2-135M, fp32 weights, 30 layers x 3 kv heads x head_dim 64); residual window "
        f"{a.residual} tokens for every quantized cache; rotated: keys and values rotated per head by a seeded "
        "randomized Hadamard matrix before quantization (keys then per token), unrotated: keys per channel; "
        "(default): what QuantizedKVCache(config, bits) does. The model runs hfquant's rotated attention (as a "
        "hfquant model with kv_cache_bits does; hfquant/attention.py): rotated caches are read as stored, the query "
        "and the attention output rotated instead. Preallocated: transformers' DynamicCache with hfquant's "
        "PreallocatedLayer, what generate gives a hfquant model without kv_cache_bits. "
        f"Perplexity: WikiText-2 test, {a.windows} windows of 512 "
        "tokens fed in chunks of 32 through the cache. Greedy agreement: 64 tokens after each of "
        f"{a.prompts} 384-token prompts spread over WikiText-2 test, against the fp cache (share of equal tokens, "
        "median position of the first different token, prompts with all 64 equal). Bytes/token: the cache's tensors (codes, fp16 scales and mins, residual "
        f"window) / context at {Lmax} tokens; the bf16 ratio is against the fp32 DynamicCache halved. Decode: "
        f"median of {a.reps} interleaved runs of {a.new_tokens} greedy tokens into the prefilled cache (after one "
        "warm-up run; the context grows by that much per run); "
        f"x = against the fp cache at that context. Run {time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"{time.perf_counter() - t_start:.0f} s.", "",
        common.md_table(header, table)])
    print(body)
    if a.write_docs:
        common.write_doc_section(a.docs, "kv-cache" + ("-quick" if a.quick else ""), body, DOC_INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
