"""Quantized KV cache on sliding-window and alternating-layer models, with real weights.

The default model's weights (SmolLM2-135M, a Llama) load unchanged into two other classes:
MistralForCausalLM with sliding_window=256 (every layer sliding), and Qwen2ForCausalLM with
``layer_types`` alternating sliding (window 256) / full attention and its q/k/v biases set to
zero. On a 200-token input (inside the window) both give the Llama's float logits; the
script checks that first. Then, for each, against the float DynamicCache on the same model:

* greedy agreement of the int8 cache: share of 64 greedy tokens equal to the fp cache's after
  each of 8 prompts of 384 tokens (quick: 2) spread over WikiText-2 test, and per step (the fp
  cache's tokens fed, argmax compared), beside the same for the Llama itself (full attention);
* decode speed: those greedy runs timed, the fp, int8 and int4 caches interleaved;
* perplexity with the int4 cache in the loop (hfquant.evaluate.perplexity_with_cache, windows
  of 512 tokens fed in chunks of 32: the window of 256 slides inside each);
* the tokens a sliding layer holds after 8192 tokens of context (quick: 2048), fed in chunks
  of 512, against its bound sliding_window + residual_length + group_size, and the cache's
  bytes against a full-attention-only quantized cache.

    python benchmarks/bench_kv_layer_types.py
    python benchmarks/bench_kv_layer_types.py --quick
    python benchmarks/bench_kv_layer_types.py --write-docs
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, DynamicCache, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

from hfquant import QuantizedKVCache, data  # noqa: E402
from hfquant.evaluate import perplexity_with_cache  # noqa: E402

DOC_INTRO = "# Benchmarks\n"
WINDOW = 256
REFERENCE = "LlamaForCausalLM (reference: full attention)"
PROMPT, NEW = 384, 64
# the shared config fields of a Llama that Mistral and Qwen2 read the same way
_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
           "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id")


def variants(llama) -> dict[str, torch.nn.Module]:
    """The Llama's weights in MistralForCausalLM (sliding) and Qwen2ForCausalLM (alternating)."""
    c = llama.config
    fields = {k: getattr(c, k) for k in _FIELDS if getattr(c, k, None) is not None}
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    state = llama.state_dict()
    mistral = MistralForCausalLM(MistralConfig(**fields, head_dim=head_dim, sliding_window=WINDOW))
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c.num_hidden_layers)]
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**fields, use_sliding_window=True, sliding_window=WINDOW,
                                         max_window_layers=0, layer_types=layer_types))
    out = {}
    for name, model in (("MistralForCausalLM, sliding_window 256", mistral),
                        ("Qwen2ForCausalLM, sliding/full alternating", qwen2)):
        sd = dict(state)
        for key, p in model.state_dict().items():
            if key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                sd[key] = torch.zeros_like(p)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise SystemExit(f"{name}: the weights do not load unchanged (missing {missing}, unexpected {unexpected})")
        out[name] = model.eval()
    return out


@torch.no_grad()
def greedy(model, prompt, cache) -> list[int]:
    out = model(prompt, cache=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    toks = [int(token)]
    for _ in range(NEW - 1):
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        toks.append(int(token))
    return toks


@torch.no_grad()
def forced(model, prompt, tokens: list[int], cache) -> float:
    """Share of the steps whose argmax is ``tokens``' next one when ``tokens`` (the fp cache's
    greedy continuation) are fed: per-step agreement, which one early near-tie cannot cascade."""
    token = model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    same = int(token) == tokens[0]
    for i in range(len(tokens) - 1):
        token = model(torch.tensor([[tokens[i]]]), cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        same += int(token) == tokens[i + 1]
    return same / len(tokens)


@torch.no_grad()
def long_context(model, ids, make) -> QuantizedKVCache:
    cache = make()
    for i in range(0, ids.shape[1], 512):
        model(ids[:, i:i + 512], cache=cache, use_cache=True)
    return cache


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=None, help="greedy-agreement prompts (default 8, quick 2)")
    p.add_argument("--windows", type=int, default=None, help="perplexity windows of 512 (default 8, quick 2)")
    p.add_argument("--context", type=int, default=None, help="long-context tokens (default 8192, quick 2048)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    a = p.parse_args(argv)
    a.prompts = a.prompts or (2 if a.quick else 8)
    a.windows = a.windows or (2 if a.quick else 8)
    a.context = a.context or (2048 if a.quick else 8192)
    command = common.command_line(__file__, argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    load_start = common.load_average()
    md = str(data.default_model_dir("float32"))
    tok = AutoTokenizer.from_pretrained(md)
    llama = AutoModelForCausalLM.from_pretrained(md).eval()
    text = data.wikitext_test()
    all_ids = tok(text, return_tensors="pt").input_ids
    step = (all_ids.shape[1] - PROMPT) // a.prompts
    prompts = [all_ids[:, i * step:i * step + PROMPT] for i in range(a.prompts)]

    with torch.no_grad():
        ref_logits = llama(all_ids[:, :200]).logits
    rows, ok = [], True
    ids = all_ids[:, :a.context]
    full_bytes = long_context(llama, ids, lambda: QuantizedKVCache(llama.config, bits=4)).memory_bytes()
    # the Llama itself first: what the int8 cache does to greedy decoding without any sliding layer
    for name, model in [(REFERENCE, llama)] + list(variants(llama).items()):
        with torch.no_grad():
            diff = (model(all_ids[:, :200]).logits - ref_logits).abs().max().item()
        if diff > 1e-4:
            raise SystemExit(f"{name}: float logits differ from the Llama's inside the window (max {diff:.2e})")
        cfg = model.config
        fp_ppl = perplexity_with_cache(model, tok, text, lambda: DynamicCache(config=cfg), max_windows=a.windows)
        q4_ppl = perplexity_with_cache(model, tok, text, lambda: QuantizedKVCache(cfg, bits=4),
                                       max_windows=a.windows)
        agree, step_agree, secs = [], [], {"fp": [], "int8": [], "int4": []}
        for prompt in prompts:  # the caches interleaved prompt by prompt; each greedy run timed
            t0 = time.perf_counter()
            ref = greedy(model, prompt, DynamicCache(config=cfg))
            t1 = time.perf_counter()
            q8 = greedy(model, prompt, QuantizedKVCache(cfg, bits=8))
            t2 = time.perf_counter()
            greedy(model, prompt, QuantizedKVCache(cfg, bits=4))
            secs["fp"].append(t1 - t0), secs["int8"].append(t2 - t1), secs["int4"].append(time.perf_counter() - t2)
            agree.append(sum(x == y for x, y in zip(ref, q8)) / NEW)
            step_agree.append(forced(model, prompt, ref, QuantizedKVCache(cfg, bits=8)))
        speed = {k: statistics.median(secs["fp"]) / statistics.median(v) for k, v in secs.items() if k != "fp"}
        if model is llama:
            held = bound = None
            cache_bytes = full_bytes
        else:
            cache = long_context(model, ids, lambda: QuantizedKVCache(cfg, bits=4))
            held = max(layer.stored_tokens() for layer in cache.layers if layer.is_sliding)
            bound = WINDOW + cache.residual_length + cache.group_size
            cache_bytes = cache.memory_bytes()
        row = dict(name=name, fp=fp_ppl, q4=q4_ppl, agree=statistics.mean(agree), step=statistics.mean(step_agree),
                   tok_s=NEW / statistics.median(secs["fp"]), speed=speed,
                   held=held, bound=bound, bytes=cache_bytes, full_bytes=full_bytes, diff=diff)
        row["pass"] = row["agree"] >= 0.98 and abs(q4_ppl / fp_ppl - 1) <= 0.01 and (held is None or held <= bound)
        ok &= row["pass"]
        rows.append(row)
        print(f"{name}: logits vs Llama {diff:.1e}; int8 agreement {row['agree']:.1%} (per step "
              f"{row['step']:.1%}); ppl fp {fp_ppl:.3f} int4 {q4_ppl:.3f} ({100 * (q4_ppl / fp_ppl - 1):+.2f}%); "
              f"sliding layer holds {held} (bound {bound})", file=sys.stderr, flush=True)

    info = common.system_info(a.threads)
    header = ["model (SmolLM2-135M weights)", "fp logits vs Llama (200 tokens)",
              f"int8 greedy agreement ({NEW} tokens, {a.prompts} prompts)", "int8 per-step agreement",
              "perplexity fp / int4 (vs fp)", "decode tok/s fp cache; int8, int4 (vs fp)",
              f"tokens a sliding layer holds at {a.context} (bound)",
              f"int4 cache bytes at {a.context} (full-attention cache)",
              "checks"]
    table = [[r["name"], f"max abs diff {r['diff']:.1e}", f"{r['agree']:.1%}", f"{r['step']:.1%}",
              f"{r['fp']:.3f} / {r['q4']:.3f} ({100 * (r['q4'] / r['fp'] - 1):+.2f}%)",
              f"{r['tok_s']:.1f}; {r['speed']['int8']:.2f}x, {r['speed']['int4']:.2f}x",
              "no sliding layer" if r["held"] is None else f"{r['held']} ({r['bound']})",
              f"{r['bytes'] / 2**20:.2f} MiB ({r['full_bytes'] / 2**20:.2f} MiB)",
              "pass" if r["pass"] else "FAIL"] for r in rows]
    body = "\n".join([
        "### Quantized KV cache on sliding-window and alternating layers" +
        (" (PLACEHOLDER: --quick smoke run)" if a.quick else ""), "",
        f"Command: `{command}`", "", common.header_line(info) + ".", "",
        "The default model's float weights loaded unchanged into MistralForCausalLM (sliding_window 256, every "
        "layer) and Qwen2ForCausalLM (layer_types alternating sliding 256 / full, q/k/v biases zero); inside the "
        "window both give the Llama's logits. Each QuantizedKVCache uses the defaults (group 64 for head_dim 64, "
        f"residual 128) and is compared to the float DynamicCache on the same model; the first row is the Llama "
        f"itself (full attention only), the int8 cache's effect without any sliding layer. Greedy agreement: "
        f"{NEW} tokens after each of {a.prompts} {PROMPT}-token prompts spread over WikiText-2 test, position by "
        "position (after a first differing token the continuations differ); per step: the fp cache's greedy "
        "tokens fed to the int8-cache model, the share of steps whose argmax is the next of them. Decode speed: "
        f"the same greedy runs timed (fp, int8, int4 interleaved prompt by prompt; {NEW} tokens each, prefill "
        f"of the {PROMPT}-token prompt included), median over the prompts, {a.threads} threads; load average "
        f"{load_start} at the start, {common.load_average()} at the end. Perplexity: "
        f"WikiText-2 test, {a.windows} windows of 512 tokens fed in chunks of 32 through the cache. Long context: "
        f"{a.context} tokens fed in chunks of 512; tokens held = quantized store + full-precision window of the "
        "fullest sliding layer, bound = window + residual + group. Checks: agreement >= 98%, int4 perplexity "
        "within 1% of fp, tokens held within the bound. "
        f"Run {time.strftime('%Y-%m-%d', time.gmtime())}, {time.perf_counter() - t_start:.0f} s.", "",
        common.md_table(header, table)])
    print(body)
    if a.write_docs:
        common.write_doc_section(a.docs, "kv-layer-types" + ("-quick" if a.quick else ""), body, DOC_INTRO)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
