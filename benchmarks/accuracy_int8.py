"""Perplexity of the int8-activation methods on the default model (or any model dir).

Evaluates, in one process, the plain model and W8 weight-only beside LLM.int8 at several
thresholds, W8A8 without smoothing and W8A8/LLM.int8 with SmoothQuant at several alphas;
reports perplexity and its change against the float model, plus the share of outlier
columns LLM.int8 sees. Calibration uses the WikiText-2 validation split, evaluation the
start of the test split (disjoint).

    python benchmarks/accuracy_int8.py                  # 8 windows of 512 tokens
    python benchmarks/accuracy_int8.py --windows 40 --write-docs
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

import hfquant  # noqa: E402
from hfquant import data  # noqa: E402
from hfquant.evaluate import perplexity  # noqa: E402
from hfquant.nn import Int8Linear  # noqa: E402

DOC_INTRO = "# Accuracy\n"

CONFIGS = [
    ("fp32", None),
    ("W8 weight-only (per channel)", dict(bits=8, group_size=-1)),
    ("LLM.int8, threshold 6, norm scales folded (default)", dict(method="llm_int8")),
    ("LLM.int8, threshold 6, as published (fold_norms=False)", dict(method="llm_int8", fold_norms=False)),
    ("LLM.int8, threshold 4, as published", dict(method="llm_int8", llm_int8_threshold=4.0, fold_norms=False)),
    ("LLM.int8, threshold 3, as published", dict(method="llm_int8", llm_int8_threshold=3.0, fold_norms=False)),
    ("W8A8 dynamic, no smoothing (default)", dict(method="w8a8")),
    ("W8A8 dynamic, norm scales folded", dict(method="w8a8", fold_norms=True)),
    ("W8A8 + SmoothQuant alpha 0.5", dict(method="w8a8", smoothquant_alpha=0.5)),
    ("W8A8 + SmoothQuant alpha 0.6", dict(method="w8a8", smoothquant_alpha=0.6)),
    ("W8A8 + SmoothQuant alpha 0.7", dict(method="w8a8", smoothquant_alpha=0.7)),
    ("LLM.int8 (t=6) + SmoothQuant alpha 0.5", dict(method="llm_int8", smoothquant_alpha=0.5)),
]


def outlier_share(model, tokenizer, text: str) -> float | None:
    """Mean share of input columns LLM.int8 routes to floating point, over the int8 layers,
    on one 512-token window."""
    shares: list[float] = []

    def hook(mod, args):
        if mod.threshold > 0:
            x = args[0]
            shares.append((~(x.abs() < mod.threshold)).reshape(-1, x.shape[-1]).any(0).float().mean().item())

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, Int8Linear)]
    try:
        ids = tokenizer(text[:20000], return_tensors="pt").input_ids[:, :512]
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return sum(shares) / len(shares) if shares else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2-135M, fp32)")
    p.add_argument("--windows", type=int, default=8, help="512-token windows of WikiText-2 test (default 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "accuracy.md")
    args = p.parse_args(argv)
    command = common.command_line(__file__, argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model or str(data.default_model_dir("float32"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = data.wikitext_test()
    rows, base = [], None
    t0 = time.perf_counter()
    for label, settings in CONFIGS:
        t = time.perf_counter()
        cfg = hfquant.HfQuantConfig(**settings) if settings else None
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg)
        load_s = time.perf_counter() - t
        ppl = perplexity(model, tok, text, max_length=512, stride=512, max_windows=args.windows)
        base = base or ppl
        share = outlier_share(model, tok, text) if settings and settings.get("method") == "llm_int8" else None
        rows.append([label, f"{ppl:.3f}", f"{100 * (ppl / base - 1):+.2f}%",
                     f"{100 * share:.2f}%" if share is not None else "", f"{load_s:.0f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        del model
    table = common.md_table(["config", "perplexity", "vs fp32", "outlier columns (LLM.int8)", "load + quantize s"],
                            rows)
    body = "\n".join([
        "### Int8 activations: LLM.int8, W8A8, SmoothQuant", "",
        f"Command: `{command}`", "",
        f"Model {Path(model_dir).name}; WikiText-2 raw test, first {args.windows} windows of 512 tokens (stride 512); "
        "SmoothQuant calibrated on 32 windows of 512 tokens of WikiText-2 validation; "
        f"{args.threads} threads, {common.cpu_model()}; run {time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"{time.perf_counter() - t0:.0f} s.", "", table, "",
        "Outlier columns: mean over the int8 layers of the share of input columns with a value |x| >= threshold "
        "in one 512-token window (those columns are multiplied in fp32)."])
    print(body)
    if args.write_docs:
        common.write_doc_section(args.docs, "accuracy-int8", body, DOC_INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
