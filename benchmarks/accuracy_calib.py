"""Perplexity of the calibrated weight-only methods (GPTQ, AWQ) beside round-to-nearest.

Each config is quantized on load from the float default model (calibration on WikiText-2
validation windows), saved (size on disk), and scored on the start of WikiText-2 test
(disjoint from the calibration text). Reports perplexity, its change against fp32, the
share of RTN's gap a method recovers, size on disk and the quantize time.

    python benchmarks/accuracy_calib.py                          # all configs, 128 windows
    python benchmarks/accuracy_calib.py --samples 32 --configs rtn-w4g128,gptq-w4g128
    python benchmarks/accuracy_calib.py --write-docs
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

import hfquant  # noqa: E402
from hfquant import data  # noqa: E402
from hfquant.evaluate import perplexity, size_on_disk  # noqa: E402

DOC_INTRO = "# Accuracy\n"

# name: (label, settings, RTN config whose gap it is judged against). The symmetric RTN rows
# keep the range grid (grid="range", format version 1): GPTQ and AWQ place their grids that way,
# so their "RTN gap recovered" compares like with like (rtn's default grid, "best", is measured
# in docs/accuracy.md, defaults-validation).
CONFIGS = {
    "fp32": ("fp32", None, None),
    "rtn-w4g128": ("RTN W4 g128 symmetric", dict(grid="range", bits=4, group_size=128), None),
    "gptq-w4g128": ("GPTQ W4 g128 symmetric (act-order)", dict(bits=4, group_size=128, method="gptq"), "rtn-w4g128"),
    "awq-w4g128": ("AWQ W4 g128 symmetric", dict(bits=4, group_size=128, method="awq"), "rtn-w4g128"),
    "rtn-w4g128a": ("RTN W4 g128 asymmetric", dict(bits=4, group_size=128, symmetric=False), None),
    "gptq-w4g128a": ("GPTQ W4 g128 asymmetric (act-order)",
                     dict(bits=4, group_size=128, symmetric=False, method="gptq"), "rtn-w4g128a"),
    "awq-w4g128a": ("AWQ W4 g128 asymmetric", dict(bits=4, group_size=128, symmetric=False, method="awq"),
                    "rtn-w4g128a"),
    "rtn-w4c": ("RTN W4 per channel symmetric", dict(grid="range", bits=4, group_size=-1), None),
    "rtn-w4g64": ("RTN W4 g64 symmetric", dict(grid="range", bits=4, group_size=64), None),
    "rtn-w4g32": ("RTN W4 g32 symmetric", dict(grid="range", bits=4, group_size=32), None),
    "gptq-w4c": ("GPTQ W4 per channel symmetric (act-order)", dict(bits=4, group_size=-1, method="gptq"), "rtn-w4c"),
    "gptq-w4g128-noact": ("GPTQ W4 g128 symmetric, no act-order",
                          dict(bits=4, group_size=128, method="gptq", act_order=False), "rtn-w4g128"),
    # 3-bit (bit-stream codes on disk, run on the 4-bit kernels)
    "rtn-w3g128a": ("RTN W3 g128 asymmetric", dict(bits=3, group_size=128, symmetric=False), None),
    "gptq-w3g128a": ("GPTQ W3 g128 asymmetric (act-order)",
                     dict(bits=3, group_size=128, symmetric=False, method="gptq"), "rtn-w3g128a"),
    "rtn-w3g128": ("RTN W3 g128 symmetric", dict(grid="range", bits=3, group_size=128), None),
    "gptq-w3g128": ("GPTQ W3 g128 symmetric (act-order)", dict(bits=3, group_size=128, method="gptq"),
                    "rtn-w3g128"),
    # token embedding (tied lm_head shares it) quantized too: every weight counted
    "rtn-w4g128-e4": ("RTN W4 g128 symmetric, embedding W4",
                      dict(grid="range", bits=4, group_size=128, quantize_embeddings=True), None),
    "rtn-w4g128a-e4": ("RTN W4 g128 asymmetric, embedding W4",
                       dict(bits=4, group_size=128, symmetric=False, quantize_embeddings=True), None),
    "rtn-w4g128a-e8": ("RTN W4 g128 asymmetric, embedding W8 g128",
                       dict(bits=4, group_size=128, symmetric=False, quantize_embeddings=True,
                            modules_override={"embed_tokens": {"bits": 8}}), None),
    "gptq-w4g128-e8": ("GPTQ W4 g128 symmetric (act-order), embedding W8 g128",
                       dict(bits=4, group_size=128, method="gptq", quantize_embeddings=True,
                            modules_override={"embed_tokens": {"bits": 8}}), "rtn-w4g128"),
    "gptq-w4g128a-e8": ("GPTQ W4 g128 asymmetric (act-order), embedding W8 g128",
                        dict(bits=4, group_size=128, symmetric=False, method="gptq", quantize_embeddings=True,
                             modules_override={"embed_tokens": {"bits": 8}}), "rtn-w4g128a"),
    "mixed4.5a": ("Mixed 4.5 stored bits/weight (RTN, asymmetric g128, embedding included)",
                  dict(method="mixed", target_bits=4.5, group_size=128, symmetric=False), None),
    "mixed4.5": ("Mixed 4.5 stored bits/weight (RTN, symmetric g128, embedding included)",
                 dict(method="mixed", target_bits=4.5, group_size=128), None),
    "mixed4.5a-gptq": ("Mixed 4.5 stored bits/weight (GPTQ, asymmetric g128, embedding included)",
                       dict(method="mixed", target_bits=4.5, group_size=128, symmetric=False, mixed_base="gptq"),
                       None),
    # the model in bf16 (embedding and norms bf16 on disk), as peers' 4-bit checkpoints are
    "bf16": ("bf16 model", "bf16", None),
    "rtn-w4g128-bf16": ("RTN W4 g128 symmetric, bf16 model", dict(grid="range", bits=4, group_size=128), None),
    "gptq-w4g128-bf16": ("GPTQ W4 g128 symmetric, bf16 model", dict(bits=4, group_size=128, method="gptq"),
                         "rtn-w4g128-bf16"),
    "gptq-w4g128a-bf16": ("GPTQ W4 g128 asymmetric, bf16 model",
                          dict(bits=4, group_size=128, symmetric=False, method="gptq"), "rtn-w4g128-bf16"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2-135M, fp32)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens (default 128)")
    p.add_argument("--windows", type=int, default=8, help="512-token windows of WikiText-2 test (default 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "accuracy.md")
    p.add_argument("--section", default="accuracy-calib", help="docs section to (re)write")
    p.add_argument("--mixed-samples", type=int, default=16, help="calibration windows of mixed (rtn) (default 16)")
    p.add_argument("--plot-dir", type=Path, default=None, help="write the bits-per-layer plot of mixed configs here")
    p.add_argument("--title", default="Calibrated weight-only methods: GPTQ, AWQ")
    args = p.parse_args(argv)
    command = common.command_line(__file__, argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; use {list(CONFIGS)}")
    torch.set_num_threads(args.threads)
    model_dir = args.model or str(data.default_model_dir("float32"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = data.wikitext_test()
    ppls: dict[str, float] = {}
    rows = []
    t0 = time.perf_counter()
    base = None
    for name in (["fp32"] if "fp32" not in names else []) + names:
        label, settings, rtn = CONFIGS[name]
        t = time.perf_counter()
        cfg = None
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        if isinstance(settings, dict):
            samples = args.mixed_samples if settings.get("method") == "mixed" and \
                settings.get("mixed_base", "rtn") == "rtn" else args.samples
            extra = {"calibration": {"n_samples": samples, "seq_len": 512}} if settings.get("method") else {}
            cfg = hfquant.HfQuantConfig(**common.weights_alone(settings), **extra)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=dtype)
        quant_s = time.perf_counter() - t
        if name == "fp32":  # the size ratios' denominator: the parameters in bf16 (tied ones once)
            bf16_bytes = 2 * sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            size = size_on_disk(d)
            if args.plot_dir and isinstance(settings, dict) and settings.get("method") == "mixed":
                from hfquant.evaluate.bits_plot import bits_summary, checkpoint_bits, plot_bits

                entries = checkpoint_bits(d)
                png = plot_bits(entries, str(args.plot_dir / f"bits_{name}.png"), title=label)
                print(f"{name}: {bits_summary(entries)}; plot {png}", file=sys.stderr)
        with common.float_activations():
            ppl = perplexity(model, tok, text, max_length=512, stride=512, max_windows=args.windows)
        ppls[name] = ppl
        base = base or ppl
        recovered = ""
        if rtn in ppls and ppls[rtn] > base:
            recovered = f"{100 * (ppls[rtn] - ppl) / (ppls[rtn] - base):.0f}%"
        rows.append([label, f"{ppl:.3f}", f"{100 * (ppl / base - 1):+.2f}%", recovered, f"{size / 1e6:.1f}",
                     f"{size / bf16_bytes:.3f}", f"{quant_s:.0f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        del model
    table = common.md_table(["config", "perplexity", "vs fp32", "RTN gap recovered", "size on disk MB",
                             "x bf16 size", "load + quantize s"], rows)
    body = "\n".join([
        f"### {args.title}", "",
        f"Command: `{command}`", "",
        f"Model {Path(model_dir).name}; WikiText-2 raw test, first {args.windows} windows of 512 tokens (stride 512); "
        f"GPTQ/AWQ calibrated on {args.samples} windows of 512 tokens of WikiText-2 validation; "
        f"{args.threads} threads, {common.cpu_model()}; run {time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"{time.perf_counter() - t0:.0f} s.", "", table, "",
        "RTN gap recovered: (ppl(RTN) - ppl(method)) / (ppl(RTN) - ppl(fp32)) against the RTN row of the same "
        "scheme. Sizes: the tied embedding (28.3M parameters) stays in full precision (113 MB in the fp32 rows, "
        "57 MB in the bf16 rows) except in the rows that name an embedding setting and the mixed rows, where it is "
        "quantized and the tied lm_head shares it. x bf16 size: size on disk over the parameters in bf16 "
        "(tied ones once). " + common.WEIGHTS_ALONE_NOTE])
    print(body)
    if args.write_docs:
        common.write_doc_section(args.docs, args.section, body, DOC_INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
