"""hfquant.evaluate.perplexity against the transformers perplexity guide's own loop.

    python benchmarks/perplexity_check.py [--tokens 2048] [--write-docs]

Same model (the default fp32 model), same text (WikiText-2 test), same windows: our sliding
window perplexity and the guide's computation (``model(input_ids, labels=target_ids).loss``
weighted by the tokens scored, overlap labels -100), with disjoint windows (stride 512) and
overlapping ones (stride 256). --write-docs puts the table in docs/accuracy.md.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, write_doc_section  # noqa: E402

from hfquant import data  # noqa: E402
from hfquant.evaluate import perplexity  # noqa: E402


@torch.no_grad()
def guide_perplexity(model, encodings, max_length, stride):
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    md = str(data.default_model_dir("float32"))
    tok = AutoTokenizer.from_pretrained(md)
    model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32).eval()
    text = data.wikitext_test()
    ids = tok(text, return_tensors="pt").input_ids[:, :a.tokens]
    rows = []
    t0 = time.time()
    for stride in (512, 256):
        ours = perplexity(model, tok, text, max_length=512, stride=stride, max_tokens=a.tokens)
        ref = guide_perplexity(model, ids, 512, stride)
        rows.append((stride, ours, ref))
        print(f"stride {stride}: hfquant {ours:.4f}  guide {ref:.4f}  diff {100 * (ours / ref - 1):+.4f}%")
    body = "\n".join([
        "### Perplexity method check (hfquant.evaluate.perplexity vs the transformers guide)", "",
        f"Command: `python benchmarks/perplexity_check.py --tokens {a.tokens} --write-docs`", "",
        f"Default model in fp32, first {a.tokens} tokens of WikiText-2 test, windows of 512 tokens; the guide's "
        "loop computed independently (`model(input_ids, labels=target_ids).loss` weighted by the tokens scored, "
        f"overlap labels -100). {a.threads} threads, {cpu_model()}; run "
        f"{datetime.date.today().isoformat()}, {time.time() - t0:.0f} s.", "",
        "| stride | hfquant | transformers guide | difference |", "|---|---|---|---|"]
        + [f"| {s} | {o:.4f} | {r:.4f} | {100 * (o / r - 1):+.4f}% |" for s, o, r in rows]
        + ["", "Stride 512: disjoint windows (the `compare` default); stride 256: each scored token has at "
           "least 256 tokens of context, hence the lower figure."])
    if a.write_docs:
        write_doc_section(Path(__file__).resolve().parent.parent / "docs" / "accuracy.md", "perplexity-check",
                          body, "# Accuracy")


if __name__ == "__main__":
    main()
