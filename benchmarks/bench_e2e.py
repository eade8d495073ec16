"""End-to-end decode speed on the default model: hfquant beside fp32/bf16 and peer libraries.

All models are loaded in one process; decode tokens/s (batch 1, greedy, prefill excluded) is
measured round-robin over the models, `--reps` times, and the median is reported. Peers
(torchao, optimum-quanto) are used through transformers' own quantization_config when they
are installed (`pip install torchao==0.14.1 optimum-quanto`: later torchao releases dropped the CPU int4 layout); a peer that fails is listed with why.

    python benchmarks/bench_e2e.py [--threads 2] [--reps 5] [--new-tokens 64] [--write-docs]
"""
from __future__ import annotations

import argparse
import gc
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _cpu_line() -> str:
    import hfquant

    feats = [k for k, v in hfquant._ext._C.cpu_features().items() if v]
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"CPU: {model}; features: {', '.join(feats)}; hfquant kernel path: {hfquant._ext._C.cpu_isa()}; "
            f"threads: {torch.get_num_threads()}; torch {torch.__version__}")


def competitors(base):
    from transformers import AutoModelForCausalLM

    import hfquant

    H = hfquant.HfQuantConfig
    # the untied lm_head at W8 per channel beside the float embedding
    head8 = dict(quantize_embeddings=False, modules_to_not_convert=[],
                 modules_override={"lm_head": {"bits": 8, "group_size": -1}})
    yield "fp32", lambda: AutoModelForCausalLM.from_pretrained(base)
    yield "bf16", lambda: AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    for dt, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        yield f"hfquant W8 ({dname})", lambda dt=dt: AutoModelForCausalLM.from_pretrained(
            base, dtype=dt, quantization_config=H(bits=8, group_size=-1))
        # the default: the tied embedding quantized (W8 g128) and the lm_head sharing its packed table
        yield f"hfquant W4 g128, default: embedding/tied head W8 ({dname})", \
            lambda dt=dt: AutoModelForCausalLM.from_pretrained(
                base, dtype=dt, quantization_config=H(bits=4, group_size=128))
        yield f"hfquant W4 g128, float embedding/head ({dname})", lambda dt=dt: AutoModelForCausalLM.from_pretrained(
            base, dtype=dt, quantization_config=H(bits=4, group_size=128, quantize_embeddings=False))
        yield f"hfquant W4 g64 asym ({dname})", lambda dt=dt: AutoModelForCausalLM.from_pretrained(
            base, dtype=dt, quantization_config=H(bits=4, group_size=64, symmetric=False))
        yield f"hfquant W4 g128, float embedding + W8 untied head ({dname})", \
            lambda dt=dt: AutoModelForCausalLM.from_pretrained(
                base, dtype=dt, quantization_config=H(bits=4, group_size=128, **head8))

    # peers load exactly as `hfquant compare` loads them
    from hfquant.evaluate.run_one import load

    for label, name in (("torchao int8 (bf16)", "torchao-int8"), ("torchao int4 g64 (bf16)", "torchao-int4g64"),
                        ("torchao int4 g128 (bf16)", "torchao-int4g128"), ("quanto int8 (bf16)", "quanto-int8"),
                        ("quanto int4 (bf16)", "quanto-int4")):
        yield label, lambda name=name: load(str(base), name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of competitor names to keep")
    ap.add_argument("--write-docs", action="store_true", help="replace the e2e section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.disable(logging.WARNING)

    from transformers import AutoTokenizer

    from hfquant import data
    from hfquant.evaluate import decode_speed, model_bytes

    base = data.default_model_dir("float32")
    tok = AutoTokenizer.from_pretrained(base)
    models, failed = {}, {}
    for name, load in competitors(base):
        if args.only and not any(s in name for s in args.only):
            continue
        try:
            m = load()
            decode_speed(m, tok, new_tokens=4, repeats=1)  # warm-up, and proves it runs
            models[name] = m
        except Exception as exc:  # a peer that is missing or fails is reported, not fatal
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            gc.collect()
    rates = {n: [] for n in models}
    for _ in range(args.reps):  # round-robin: drift in machine load hits every model alike
        for name, m in models.items():
            rates[name].append(decode_speed(m, tok, new_tokens=args.new_tokens, repeats=1))
    med = {n: statistics.median(r) for n, r in rates.items()}
    cmd = "python benchmarks/bench_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{cmd.strip()}`", "", _cpu_line(), "",
             f"Decode, batch 1, greedy, {args.new_tokens} new tokens after a 32-token prompt, median of "
             f"{args.reps} round-robin repetitions.", "",
             "| model | memory (MB) | decode tok/s | vs fp32 | vs bf16 |", "|---|---|---|---|---|"]
    for name in models:
        ratio = {b: f"{med[name] / med[b]:.2f}x" if b in med else "n/a" for b in ("fp32", "bf16")}
        lines.append(f"| {name} | {model_bytes(models[name]) / 1e6:.0f} | {med[name]:.1f} | "
                     f"{ratio['fp32']} | {ratio['bf16']} |")
    for name, why in failed.items():
        lines.append(f"| {name} | n/a | n/a ({why}) | | |")
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        doc = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
        begin, end = "<!-- e2e:begin -->", "<!-- e2e:end -->"
        body = doc.read_text() if doc.exists() else "# Benchmarks\n"
        section = f"{begin}\n## End to end: decode speed on the default model\n\n{text}\n{end}"
        if begin in body:
            body = body[: body.index(begin)] + section + body[body.index(end) + len(end):]
        else:
            body = body.rstrip() + "\n\n" + section + "\n"
        doc.write_text(body)


if __name__ == "__main__":
    main()
