"""How much of round to nearest's perplexity loss training recovers, on the default model.

W4 per channel symmetric (where RTN loses clearly). Methods, each trained on WikiText-2
validation text (or on text the float model generates) and scored on the start of
WikiText-2 test (8 windows of 512 tokens, as benchmarks/accuracy_calib.py):

- ``lkd``: layer-by-layer distillation (ZeroQuant LKD): each decoder block, fake-quantized
  (weights through the straight-through estimator, learned scales), trained to match the
  float block's outputs (hfquant.qat.distill.layerwise_distill);
- ``peqa``: scale-only fine-tuning of the RTN model on next-token loss
  (hfquant.enable_scale_training);
- ``llmqat``: data-free QAT (LLM-QAT): the float model generates the training text, and the
  fake-quant model is trained against its logits (hfquant.qat.distill.distill_qat).

    python benchmarks/accuracy_qat.py --methods lkd --write-docs
"""
from __future__ import annotations

import argparse
import os
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
from hfquant.algorithms.calibration import calibration_batches  # noqa: E402
from hfquant.evaluate import perplexity  # noqa: E402
from hfquant.qat.distill import distill_qat, generate_text, layerwise_distill  # noqa: E402
from hfquant.qat.scale_training import scale_parameters  # noqa: E402

DOC_INTRO = "# Accuracy\n"
SCHEME = common.weights_alone(dict(bits=4, group_size=-1, symmetric=True))


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def run_lkd(model, tok, args):
    batches = calibration_batches(tok, None, args.lkd_samples, args.seq_len)
    layerwise_distill(model, hfquant.HfQuantConfig(**SCHEME), tok, batches=batches, epochs=args.lkd_epochs,
                      lr=args.lkd_lr, scale_lr=args.lkd_scale_lr, log=lambda s: print(s, file=sys.stderr, flush=True))
    return (f"{args.lkd_epochs} epochs x {args.lkd_samples} windows of {args.seq_len} per block "
            f"({30 * args.lkd_epochs * args.lkd_samples} block steps), Adam lr {args.lkd_lr:g} (weights), "
            f"{args.lkd_scale_lr:g} (scales)")


def run_peqa(model, tok, args):
    hfquant.quantize_model(model, hfquant.HfQuantConfig(**SCHEME))
    hfquant.enable_scale_training(model)
    batches = calibration_batches(tok, None, args.peqa_steps, args.seq_len, seed=1)
    opt = torch.optim.Adam(scale_parameters(model), lr=args.peqa_lr)
    for i, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i % 10 == 0:
            print(f"peqa step {i}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    return f"{args.peqa_steps} steps of 1 window of {args.seq_len}, Adam lr {args.peqa_lr:g}"


def run_llmqat(model, tok, args):
    t = time.perf_counter()
    texts = generate_text(model, tok, n_sequences=args.qat_sequences, length=args.qat_len, batch_size=8)
    gen_s = time.perf_counter() - t
    distill_qat(model, hfquant.HfQuantConfig(**SCHEME), texts, steps=args.qat_steps, lr=args.qat_lr,
                log=lambda i, loss: print(f"llm-qat step {i}: kl {loss:.4f}", file=sys.stderr, flush=True)
                if i % 10 == 0 else None)
    model.eval()
    return (f"{args.qat_sequences} generated sequences of {args.qat_len} ({gen_s:.0f} s to generate), "
            f"{args.qat_steps} steps, lr {args.qat_lr:g}")


METHODS = {
    "lkd": ("layer-wise distillation (ZeroQuant LKD), weights (STE) + scales", run_lkd),
    "peqa": ("scale-only fine-tuning (PEQA), next-token loss", run_peqa),
    "llmqat": ("data-free QAT (LLM-QAT), KD on generated text", run_llmqat),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="lkd", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lkd-samples", type=int, default=8)
    p.add_argument("--lkd-epochs", type=int, default=2)
    p.add_argument("--lkd-lr", type=float, default=1e-4)
    p.add_argument("--lkd-scale-lr", type=float, default=3e-4)
    p.add_argument("--peqa-steps", type=int, default=100)
    p.add_argument("--peqa-lr", type=float, default=1e-4)
    p.add_argument("--qat-sequences", type=int, default=32)
    p.add_argument("--qat-len", type=int, default=256)
    p.add_argument("--qat-steps", type=int, default=100)
    p.add_argument("--qat-lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "accuracy.md")
    args = p.parse_args(argv)
    command = common.command_line(__file__, argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; use {list(METHODS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = str(data.default_model_dir("float32"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = data.wikitext_test()

    def ppl(model):
        with torch.no_grad(), common.float_activations():
            return perplexity(model, tok, text, max_length=512, stride=512, max_windows=args.windows)

    fp32 = ppl(AutoModelForCausalLM.from_pretrained(model_dir))
    rtn = ppl(AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=hfquant.HfQuantConfig(**SCHEME)))
    print(f"fp32 {fp32:.3f}  RTN {rtn:.3f}", file=sys.stderr, flush=True)
    rows = [["fp32", "", "", "", "", f"{fp32:.3f}", "", ""],
            ["RTN W4 per channel symmetric", "", "", "", "", f"{rtn:.3f}", f"{100 * (rtn / fp32 - 1):+.1f}%", "0%"]]
    for name in names:
        label, fn = METHODS[name]
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        mon = common.CpuMonitor()
        t, c = time.perf_counter(), _cpu_s()
        setting = fn(model, tok, args)
        wall, cpu = time.perf_counter() - t, _cpu_s() - c
        load = mon.stop()
        q = ppl(model)
        other = "" if load is None else f"{load['other_pct']:.0f}%"
        rows.append([label, setting, f"{wall / 60:.1f}", f"{cpu / 60:.1f}", other, f"{q:.3f}",
                     f"{100 * (q / fp32 - 1):+.1f}%", f"{100 * (rtn - q) / (rtn - fp32):.0f}%"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        del model
    table = common.md_table(["method", "training", "wall min", "CPU min", "other load", "perplexity", "vs fp32",
                             "RTN gap recovered"], rows)
    body = "\n".join([
        "### Training on a quantized model: W4 per channel symmetric", "",
        f"Command: `{command}`", "",
        f"Model {Path(model_dir).name}; WikiText-2 raw test, first {args.windows} windows of 512 tokens (stride "
        f"512); training text: WikiText-2 validation windows (LKD, PEQA) or text the float model generated "
        f"(LLM-QAT), never the test text; {args.threads} threads, {common.cpu_model()}; run "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}.", "", table, "",
        "RTN gap recovered: (ppl(RTN) - ppl(method)) / (ppl(RTN) - ppl(fp32)). Wall min: the training alone "
        "(capture, training, conversion), not the evaluation; CPU min: this process's CPU time over the same "
        "span (both threads); other load: the share of the machine's CPU time that other processes took "
        "meanwhile (the machine is shared, so wall times are inflated by it)."])
    print(body)
    if args.write_docs:
        common.write_doc_section(args.docs, "accuracy-qat", body, DOC_INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
