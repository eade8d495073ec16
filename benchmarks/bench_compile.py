"""Decode speed of the default model at W4 g128, eager vs torch.compile (inductor).

Both runs use transformers' static KV cache (the cache torch.compile needs for one decode
graph) and greedy decoding of the same prompt; the compiled run compiles
``model.forward`` with ``fullgraph=True`` (a graph break anywhere, hfquant's modules
included, is an error). Decode speed = (new_tokens - 1) / (time of new_tokens - time of
one token), in wall time and in CPU time of the process (tokens per CPU-second: less
sensitive to other processes on a shared machine), median of --repeats rounds; each round runs eager (dynamic cache), eager
(static cache) and compiled in turn, so that all three see the same load. Prints a markdown table; with
--write-docs it replaces its section of docs/benchmarks.md (one section per --embedding-bits).

    python benchmarks/bench_compile.py [--new-tokens 64] [--threads 2] [--repeats 3] [--write-docs]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402


def _time_generate(model, ids, n, cache_impl):
    t, c = time.perf_counter(), time.process_time()
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation=cache_impl)
    return time.perf_counter() - t, time.process_time() - c, out


def _rate(model, ids, n, cache_impl):
    """(tokens per wall second, tokens per CPU second of this process), decode only."""
    w1, c1, _ = _time_generate(model, ids, 1, cache_impl)
    wn, cn, out = _time_generate(model, ids, n, cache_impl)
    return ((n - 1) / max(wn - w1, 1e-9), (n - 1) / max(cn - c1, 1e-9)), out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="only the first N decoder blocks (quick check)")
    ap.add_argument("--embedding-bits", type=int, choices=(4, 8), default=None,
                    help="quantize the token embedding and the tied lm_head too, with these bits (g128)")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args(argv)
    command = common.command_line(__file__, argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfquant
    from hfquant import _ext, data

    model_dir = str(data.default_model_dir("float32"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    extra = {} if args.layers is None else {"num_hidden_layers": args.layers}
    qcfg = dict(bits=4, group_size=128)
    if args.embedding_bits:
        qcfg.update(quantize_embeddings=True, modules_override={"embed_tokens": {"bits": args.embedding_bits}})
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=hfquant.HfQuantConfig(**qcfg), **extra)
    model.generation_config.pad_token_id = tok.eos_token_id
    ids = tok(data.wikitext_test()[:2000], return_tensors="pt").input_ids[:, : args.prompt_tokens]
    load0 = os.getloadavg()
    with torch.inference_mode():
        eager_forward = model.forward
        compiled_forward = torch.compile(eager_forward, fullgraph=True)
        model.forward = compiled_forward
        t = time.perf_counter()
        _time_generate(model, ids, 2, "static")
        compile_s = time.perf_counter() - t
        # the three variants in turn, so that each sees the same load on a shared machine
        runs = {"dynamic": [], "static": [], "compiled": []}
        cpu = {"dynamic": [], "static": [], "compiled": []}
        outs = {}
        for i in range(args.repeats + 1):
            for name in runs:
                model.forward = compiled_forward if name == "compiled" else eager_forward
                (rate, crate), outs[name] = _rate(model, ids, args.new_tokens,
                                                  "dynamic" if name == "dynamic" else "static")
                if i:  # the first round warms up
                    runs[name].append(rate)
                    cpu[name].append(crate)
        eager_dyn, eager, compiled = (statistics.median(runs[k]) for k in ("dynamic", "static", "compiled"))
        c_dyn, c_eager, c_comp = (statistics.median(cpu[k]) for k in ("dynamic", "static", "compiled"))
        out_eager, out_comp = outs["static"], outs["compiled"]
    load1 = os.getloadavg()
    same = torch.equal(out_eager, out_comp)
    feats = ", ".join(k for k, v in _ext._C.cpu_features().items() if v)
    label = "W4 g128" + (f" + embedding/lm_head W{args.embedding_bits}" if args.embedding_bits else "")
    lines = [
        f"### torch.compile decode, {label}", "",
        f"Command: `{command}`", "",
        f"CPU: {platform.processor() or platform.machine()} ({feats}); kernel path {_ext._C.int8_path()}; "
        f"{args.threads} threads; torch {torch.__version__}; load average (1/5/15 min) before "
        f"{load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, after {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f}. "
        f"{args.new_tokens} new tokens after a {args.prompt_tokens}-token prompt, medians of {args.repeats} rounds "
        f"after one warm-up round. First compiled call (compilation) {compile_s:.0f} s; greedy tokens identical "
        f"eager vs compiled: {same}.", "",
        f"| {label}, batch 1 | decode tok/s (wall) | vs eager static | decode tok per CPU-second | vs eager static |",
        "|---|---|---|---|---|",
        f"| eager, dynamic cache | {eager_dyn:.1f} | {eager_dyn / eager:.2f}x | {c_dyn:.2f} | {c_dyn / c_eager:.2f}x |",
        f"| eager, static cache | {eager:.1f} | 1.00x | {c_eager:.2f} | 1.00x |",
        f"| torch.compile (inductor, fullgraph), static cache | {compiled:.1f} | {compiled / eager:.2f}x | "
        f"{c_comp:.2f} | {c_comp / c_eager:.2f}x |",
    ]
    body = "\n".join(lines)
    print(body)
    if args.write_docs:
        section = "compile-decode" + (f"-emb{args.embedding_bits}" if args.embedding_bits else "")
        common.write_doc_section(HERE.parent / "docs" / "benchmarks.md", section, body,
                                 "# Benchmarks\n")


if __name__ == "__main__":
    main()
