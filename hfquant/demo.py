"""`make demo`: quantize the default model to W8 and W4-g128, evaluate, save, reload, generate.

Prints a table (size on disk, perplexity on a fixed WikiText-2 slice, decode tokens/s) for
the unquantized model and each quantized one.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=8, help="512-token perplexity windows (default 8)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per decode-speed run")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import hfquant
    from hfquant import data
    from hfquant.evaluate import decode_speed, perplexity, size_on_disk

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("hfquant").setLevel(logging.WARNING)

    print(f"hfquant {hfquant.__version__} | kernel path: {hfquant._ext._C.cpu_isa()} | threads: "
          f"{torch.get_num_threads()}")
    t0 = time.time()
    base = data.default_model_dir("float32")
    print(f"default model: SmolLM2-135M-Instruct (fp32 checkpoint cached in {base}, {time.time() - t0:.0f} s)")
    tok = AutoTokenizer.from_pretrained(base)
    text = data.wikitext_test()
    prompt = "The capital of France is"

    rows = []
    out_root = tempfile.mkdtemp(prefix="hfquant-demo-")
    configs = [("fp32", None), ("W8 per-channel", hfquant.HfQuantConfig(bits=8, group_size=-1)),
               # the default below 8 bits: the embedding at W8 too, and the tied lm_head (49152 x 576,
               # the largest matrix of this model) shares that table
               ("W4 g128", hfquant.HfQuantConfig(bits=4, group_size=128)),
               ("W4 g128 fp emb", hfquant.HfQuantConfig(bits=4, group_size=128, quantize_embeddings=False))]
    ref_ppl = None
    for label, cfg in configs:
        t = time.time()
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg)
        load_s = time.time() - t
        if cfg is None:
            disk = size_on_disk(base)
            reloaded = model
        else:
            out = os.path.join(out_root, cfg.short_name)
            model.save_pretrained(out)
            tok.save_pretrained(out)
            disk = size_on_disk(out)
            reloaded = AutoModelForCausalLM.from_pretrained(out)  # no config passed: read from config.json
            ids = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                same = torch.equal(model(**ids).logits, reloaded(**ids).logits)
            if not same:
                raise SystemExit(f"{label}: logits after reload differ from before save")
        ppl = perplexity(reloaded, tok, text, max_length=512, stride=512, max_windows=args.windows)
        ref_ppl = ref_ppl or ppl
        tps = decode_speed(reloaded, tok, new_tokens=args.new_tokens)
        gen = pipeline("text-generation", model=reloaded, tokenizer=tok)
        sample = gen(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
        rows.append((label, disk, ppl, 100 * (ppl / ref_ppl - 1), tps, load_s, sample))
        print(f"  done {label}: {time.time() - t:.0f} s")

    print()
    print(f"WikiText-2 test, first {args.windows} windows of 512 tokens; decode batch 1, {args.new_tokens} new tokens")
    print(f"| {'model':<15} | {'size on disk':>12} | {'ratio':>5} | {'perplexity':>10} | {'Δppl':>7} | "
          f"{'decode tok/s':>12} | {'speed-up':>8} |")
    print("|" + "|".join("-" * (w + 2) for w in (15, 12, 5, 10, 7, 12, 8)) + "|")
    for label, disk, ppl, dppl, tps, _, _ in rows:
        print(f"| {label:<15} | {disk / 1e6:>9.1f} MB | {rows[0][1] / disk:>5.2f} | {ppl:>10.2f} | "
              f"{dppl:>+6.1f}% | {tps:>12.1f} | {tps / rows[0][4]:>7.2f}x |")
    print("\nGreedy generation through pipeline() after save + reload:")
    for label, *_, sample in rows:
        print(f"  {label:<15} {sample!r}")
    print(f"\nquantized checkpoints written to {out_root}")


if __name__ == "__main__":
    main()
