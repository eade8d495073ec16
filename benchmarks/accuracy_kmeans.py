"""Perplexity of weight clustering (method "kmeans") beside uniform round-to-nearest at the same
bits, on the default model (or any model dir), and the size of each checkpoint on disk.

In one process: the float model; RTN W4 per channel and group 128, symmetric and asymmetric;
k-means 4-bit and 3-bit with one codebook per row and per group of 128. Our RTN has no 3-bit
format, so uniform 3-bit is measured by writing the RTN-rounded weights (same grids: 8 levels,
symmetric -4..3 or asymmetric 0..7 with a zero point) into the float model ("simulated").
Only the linear layers of the decoder are quantized (lm_head and the tied embedding stay
float32, as by default).

    python benchmarks/accuracy_kmeans.py                  # 8 windows of 512 tokens
    python benchmarks/accuracy_kmeans.py --write-docs
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

CONFIGS = [
    ("fp32", None),
    ("RTN W4 per channel, symmetric", dict(bits=4, group_size=-1)),
    ("RTN W4 per channel, asymmetric", dict(bits=4, group_size=-1, symmetric=False)),
    ("RTN W4 g128, symmetric", dict(bits=4, group_size=128)),
    ("RTN W4 g128, asymmetric", dict(bits=4, group_size=128, symmetric=False)),
    ("k-means 4-bit, codebook per row", dict(method="kmeans", bits=4, group_size=-1)),
    ("k-means 4-bit, codebook per row and g128", dict(method="kmeans", bits=4, group_size=128)),
    ("uniform 3-bit per channel, symmetric (simulated)", ("sim3", -1, True)),
    ("uniform 3-bit per channel, asymmetric (simulated)", ("sim3", -1, False)),
    ("uniform 3-bit g128, asymmetric (simulated)", ("sim3", 128, False)),
    ("k-means 3-bit, codebook per row", dict(method="kmeans", bits=3, group_size=-1)),
    ("k-means 3-bit, codebook per row and g128", dict(method="kmeans", bits=3, group_size=128)),
]


@torch.no_grad()
def rtn_weights(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """RTN-rounded float weights at any bits (the grids of format v1, at 2^bits levels)."""
    N, K = w.shape
    g = K if group_size == -1 else group_size
    G = -(-K // g)
    x = torch.nn.functional.pad(w.float(), (0, G * g - K)).reshape(N, G, g)
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        s = x.abs().amax(-1, keepdim=True) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s
    else:
        qmax = (1 << bits) - 1
        lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
        s = (hi - lo) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.clamp(torch.round(-lo / s), 0, qmax)
        q = (torch.clamp(torch.round(x / s) + z, 0, qmax) - z) * s
    return q.reshape(N, -1)[:, :K].to(w.dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2-135M, fp32)")
    p.add_argument("--windows", type=int, default=8, help="512-token windows of WikiText-2 test (default 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="comma list of row numbers (0 = fp32) to run")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "accuracy.md")
    args = p.parse_args(argv)
    command = common.command_line(__file__, argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model or str(data.default_model_dir("float32"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = data.wikitext_test()
    only = None if args.only is None else {int(i) for i in args.only.split(",")}
    rows, base = [], None
    t0 = time.perf_counter()
    for i, (label, settings) in enumerate(CONFIGS):
        if only is not None and i not in only and i != 0:
            continue
        t = time.perf_counter()
        size = ""
        if isinstance(settings, tuple):
            _, gs, sym = settings
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                    mod.weight.data.copy_(rtn_weights(mod.weight.data, 3, gs, sym))
        else:
            cfg = hfquant.HfQuantConfig(**common.weights_alone(settings)) if settings else None
            model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg)
        load_s = time.perf_counter() - t
        if not isinstance(settings, tuple):
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                size = f"{size_on_disk(d) / 1e6:.1f}"
        with common.float_activations():
            ppl = perplexity(model, tok, text, max_length=512, stride=512, max_windows=args.windows)
        base = base or ppl
        rows.append([label, f"{ppl:.3f}", f"{100 * (ppl / base - 1):+.2f}%", size, f"{load_s:.0f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        del model
    table = common.md_table(["config", "perplexity", "vs fp32", "size on disk MB", "load + quantize s"], rows)
    body = "\n".join([
        "### Weight clustering (k-means) vs uniform RTN", "",
        f"Command: `{command}`", "",
        f"Model {Path(model_dir).name}; WikiText-2 raw test, first {args.windows} windows of 512 tokens (stride 512); "
        f"{args.threads} threads, {common.cpu_model()}; run {time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"{time.perf_counter() - t0:.0f} s (the machine was shared: load + quantize times are upper bounds).", "",
        table, "",
        "Size on disk: the whole checkpoint, including the float32 token embedding (28.3M parameters, 108 MiB) "
        "that every config keeps. k-means stores 2^bits centroids per row (or per row and group of 128) in the "
        "model's dtype beside the bit-packed indices; its default init is the uniform grid, which Lloyd's "
        "iterations only improve. Uniform 3-bit rows are simulated (RTN-rounded weights in the float model): "
        "our RTN format has no 3-bit codes."])
    print(body)
    if args.write_docs:
        common.write_doc_section(args.docs, "accuracy-kmeans", body, DOC_INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
