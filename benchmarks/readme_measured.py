"""Writes README's "Measured" table (section readme-measured) from one `hfquant compare` run.

    python benchmarks/readme_measured.py --write-docs                 # measure, then write README
    python benchmarks/readme_measured.py --from report-readme --write-docs   # write from a finished run

It measures the default model (WikiText-2 test, first 4096 tokens = 8 windows of 512) in the
configs of the table, each in a fresh process (hfquant.evaluate.compare), keeps the run in
``--out`` (report.md, results.json) and writes the table with the run's date, CPU, CPU
features, thread count and load average. Nothing in the section is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_doc_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# config name (hfquant.evaluate.run_one.CONFIGS) -> the row's label
ROWS = {
    "fp32": "fp32 (transformers)",
    "w8": "W8 per channel",
    "w4g128": "W4 g128 (default: embedding and tied head W8 g128)",
    "w4g128f": "W4 g128, embedding/head float",
    "gptq-w4g128": "W4 g128, GPTQ (16 calibration windows)",
    "gptq-w4g128a": "W4 g128 asymmetric, GPTQ (16 windows)",
    "llm_int8": "LLM.int8 (threshold 6, norm scales folded)",
    "w8a8": "W8A8 dynamic (norm scales folded)",
    "w8a8sq": "W8A8 + SmoothQuant {smoothquant_alpha:g}",  # the alpha the run recorded
}


def render(doc: dict) -> str:
    """The README section from a compare results.json document."""
    res = {r["config"]: r for r in doc["results"]}
    base = res.get("fp32")
    if not base or not base.get("ok") or base.get("perplexity") is None:
        raise SystemExit("readme_measured: the run has no fp32 row to compare with")
    bp, bd = base["perplexity"], base["decode_tokens_per_s"]["1"]
    threads = sorted({r.get("threads") for r in doc["results"] if r.get("ok")})
    s = doc["settings"]
    lines = [
        f"On the default model (SmolLM2-135M-Instruct), WikiText-2 test, first {s['max_tokens']} tokens in "
        f"windows of {s['window']}; {doc['machine']} (CPU features: {doc['cpu_features']}); "
        f"threads: {', '.join(map(str, threads))}; load average at the end {doc.get('load_average') or 'n/a'}; "
        f"{doc['date'][:10]}. Each config in a fresh process. Written by `python benchmarks/readme_measured.py "
        f"--write-docs` from the run `{doc.get('command') or 'hfquant compare'}`.",
        "",
        "| config | perplexity | size on disk | decode tok/s (batch 1) | prefill tok/s (512) |",
        "|---|---|---|---|---|",
    ]
    for name, label in ROWS.items():
        r = res.get(name)
        if r is None:
            continue
        label = label.format(**(r.get("settings") or {}))
        if not r.get("ok"):
            lines.append(f"| {label} | n/a ({r.get('error', 'failed')}) | | | |")
            continue
        ppl = r.get("perplexity")
        ppl_s = "n/a" if ppl is None else (f"{ppl:.2f}" if name == "fp32" else f"{ppl:.2f} ({100 * (ppl / bp - 1):+.1f}%)")
        size = r.get("size_on_disk_bytes")
        size_s = "n/a" if size is None else f"{size / 1e6:.0f} MB"
        dec = r["decode_tokens_per_s"]["1"]
        dec_s = f"{dec:.1f}" + ("" if name == "fp32" else f" ({dec / bd:.2f}x)")
        pre = r.get("prefill_tokens_per_s")
        lines.append(f"| {label} | {ppl_s} | {size_s} | {dec_s} | {'n/a' if pre is None else f'{pre:.0f}'} |")
    lines += ["", "Sizes include the token embedding, tied to lm_head: float32 in the fp32, W8 and W8A8 rows and the "
              "\"embedding/head float\" row, W8 g128 (the default below 8 bits; the head shares it) in the other 4-bit "
              "rows. Perplexity is scored in 512-token windows, which the 4-bit rows run with int8 activations (the "
              "prefill default); decode steps stay weight-only. Deltas and speed ratios are against the fp32 row of "
              "the same run."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="report", default=None, help="a finished run's folder (holding results.json)")
    ap.add_argument("--out", default="report-readme", help="where the new run is kept (default report-readme)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--write-docs", action="store_true", help="write the section into README.md")
    a = ap.parse_args(argv)
    if a.report is None:
        from hfquant import data
        from hfquant.evaluate.compare import compare

        model = str(data.default_model_dir("float32"))
        configs = ",".join(ROWS)
        command = (f"hfquant compare MODEL --configs {configs} --max-tokens {a.max_tokens} --threads {a.threads} "
                   f"--out {a.out}")
        compare(model, configs=configs, max_tokens=a.max_tokens, out=a.out, threads=a.threads, command=command)
        a.report = a.out
    doc = json.loads((Path(a.report) / "results.json").read_text(encoding="utf-8"))
    body = render(doc)
    print(body)
    if a.write_docs:
        write_doc_section(ROOT / "README.md", "readme-measured", body, "# hfquant")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
