"""`hfquant compare`: measure several configurations, each in a fresh process, and write a report.

Writes report.md (one table per metric, deltas against fp32), results.json and PNG plots
(perplexity vs size on disk, decode tokens/s at batch 1 and 8, peak memory).
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .run_one import ALL_CONFIGS, CONFIGS, PEERS, RESULT_PREFIX

DEFAULT_CONFIGS = "fp32,bf16,w8,w4g128,w4g64a"


def parse_configs(configs: str, peers: str | None) -> tuple[list[str], dict[str, str]]:
    """Config names to run, and peer configs skipped (name -> why). Unknown names raise ValueError."""
    names = [c.strip() for c in configs.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        raise ValueError(f"unknown config(s) {', '.join(map(repr, bad))}; valid: {', '.join(CONFIGS)}")
    if not names:
        raise ValueError(f"no configs given; valid: {', '.join(CONFIGS)}")
    skipped = {}
    for p in [p.strip() for p in (peers or "").split(",") if p.strip()]:
        if p not in PEERS:
            raise ValueError(f"unknown peer {p!r}; valid: {', '.join(PEERS)}")
        module = {"torchao": "torchao", "quanto": "optimum.quanto"}[p]
        try:
            installed = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            installed = False
        for name in PEERS[p]:
            if installed:
                names.append(name)
            else:
                skipped[name] = f"{module} is not installed"
    return list(dict.fromkeys(names)), skipped


def run_config(name: str, worker_args: dict, timeout: float | None = None) -> dict:
    """Measure one config in a fresh `python -m hfquant.evaluate.run_one` process."""
    args = dict(worker_args, config=name)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        p = subprocess.run([sys.executable, "-m", "hfquant.evaluate.run_one", json.dumps(args)],
                           capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": name, "ok": False, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"config": name, "ok": False, "error": f"worker exited with {p.returncode}: {tail[:200]}"}


def compare(model_dir: str, configs: str = DEFAULT_CONFIGS, peers: str | None = None, text: str | None = None,
            max_tokens: int = 16384, out: str = "report", threads: int | None = None, new_tokens: int = 64,
            prompt_tokens: int = 512, repeats: int = 3, watts_per_core: float = 10.0,
            progress: bool = True) -> dict:
    """Run every config in its own process, write report.md, results.json and plots to ``out``."""
    names, skipped = parse_configs(configs, peers)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} has no config.json")
    if text is not None and not os.path.isfile(text):
        raise FileNotFoundError(f"text file {text} not found")
    worker_args = {"model_dir": os.path.abspath(model_dir), "text_file": os.path.abspath(text) if text else None,
                   "max_tokens": max_tokens, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
                   "repeats": repeats, "threads": threads, "watts_per_core": watts_per_core}
    results = []
    bar = tqdm(names, desc="compare", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        results.append(run_config(name, worker_args))
    for name, why in skipped.items():
        results.append({"config": name, "ok": False, "error": why})
    doc = {
        "model_dir": os.path.abspath(model_dir),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _cpu_name(), "python": platform.python_version(),
        "settings": {k: v for k, v in worker_args.items() if k != "model_dir"},
        "text": text or "WikiText-2 test (hfquant.data.wikitext_test)",
        "results": results,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    doc["plots"] = write_plots(results, out)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(render_report(doc))
    return doc


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _baseline(results: list[dict]) -> dict | None:
    ok = [r for r in results if r.get("ok")]
    return next((r for r in ok if r["config"] == "fp32"), ok[0] if ok else None)


def _mb(x) -> str:
    return "n/a" if x is None else f"{x / 1e6:.1f}"


def _num(x, fmt="{:.2f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _ratio(a, b, fmt="{:.2f}x") -> str:
    return "n/a" if not a or not b else fmt.format(a / b)


def render_report(doc: dict) -> str:
    """report.md: one table per metric, each against the fp32 row (or the first row that ran)."""
    res = doc["results"]
    ok = [r for r in res if r.get("ok")]
    base = _baseline(res)
    bname = base["config"] if base else "n/a"
    s = doc["settings"]
    threads = sorted({r.get("threads") for r in ok})
    L = ["# hfquant compare", "",
         f"Model: `{doc['model_dir']}`; {doc['date']}; {doc['machine']}; threads: "
         f"{', '.join(map(str, threads)) or 'n/a'}; each config measured in a fresh process.", "",
         f"Text: {doc['text']}, first {s['max_tokens']} tokens, windows of 512 tokens, stride 512. "
         f"Prefill: one forward over a {s['prompt_tokens']}-token prompt. Decode: greedy, {s['new_tokens']} new "
         f"tokens after a 32-token prompt, prefill excluded. Median of {s['repeats']} repeats. "
         f"Deltas are against **{bname}**.", ""]
    failed = [r for r in res if not r.get("ok")]
    if failed:
        L += ["Not measured (n/a):", ""] + [f"- {r['config']}: {r.get('error')}" for r in failed] + [""]

    def table(title, header, rows):
        L.extend([f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
        L.extend("| " + " | ".join(row) + " |" for row in rows)
        L.append("")

    bp = base.get("perplexity") if base else None
    table("Perplexity", ["config", "perplexity", f"vs {bname}"],
          [[r["config"], _num(r["perplexity"], "{:.3f}"),
            "n/a" if not bp else f"{100 * (r['perplexity'] / bp - 1):+.2f}%"] for r in ok])
    bs = base.get("size_on_disk_bytes") if base else None
    table("Size on disk (save_pretrained, safetensors)", ["config", "MB", f"compression vs {bname}"],
          [[r["config"], _mb(r.get("size_on_disk_bytes")) if r.get("size_on_disk_bytes") else
            f"n/a ({r.get('size_on_disk_na', '')})", _ratio(bs, r.get("size_on_disk_bytes"))] for r in ok])
    bm = base.get("memory_bytes") if base else None
    table("Weights in memory (parameters and buffers)", ["config", "MB", f"vs {bname}"],
          [[r["config"], _mb(r["memory_bytes"]), _ratio(r["memory_bytes"], bm)] for r in ok])
    bpre = base.get("prefill_tokens_per_s") if base else None
    bd = base.get("decode_tokens_per_s", {}) if base else {}
    table("Speed (tokens/s)", ["config", "prefill", "speed-up", "decode b1", "speed-up", "decode b8", "speed-up"],
          [[r["config"], _num(r["prefill_tokens_per_s"], "{:.1f}"), _ratio(r["prefill_tokens_per_s"], bpre),
            _num(r["decode_tokens_per_s"]["1"], "{:.1f}"), _ratio(r["decode_tokens_per_s"]["1"], bd.get("1")),
            _num(r["decode_tokens_per_s"]["8"], "{:.1f}"), _ratio(r["decode_tokens_per_s"]["8"], bd.get("8"))]
           for r in ok])
    bl = base.get("peak_rss_load_bytes") if base else None
    bi = base.get("peak_rss_inference_bytes") if base else None
    table("Peak RSS (MB)", ["config", "load/quantize", f"vs {bname}", "inference", f"vs {bname}"],
          [[r["config"], _mb(r["peak_rss_load_bytes"]), _ratio(r["peak_rss_load_bytes"], bl),
            _mb(r["peak_rss_inference_bytes"]), _ratio(r["peak_rss_inference_bytes"], bi)] for r in ok])
    if ok:
        L += [f"Load peak: ru_maxrss after loading (imports included, "
              f"{_mb(ok[0].get('rss_after_imports_bytes'))} MB before loading). Inference peak: "
              f"{ok[0].get('peak_rss_inference_method')} (the process's resident memory at the reset counts, "
              "e.g. the tokenized text). Plain models load by mmap, so their weight pages count only once touched: "
              "their load peak is low and their inference peak holds the weights.", ""]
    be = base["energy"]["joules_per_token"] if base else None
    table("Energy per decoded token (batch 1)", ["config", "J/token", f"vs {bname}", "method"],
          [[r["config"], _num(r["energy"]["joules_per_token"], "{:.3f}"), _ratio(r["energy"]["joules_per_token"], be),
            r["energy"]["method"]] for r in ok])
    notes = sorted({r["energy"]["note"] for r in ok})
    L += [f"Energy method: {n}." for n in notes] + ([""] if notes else [])
    if doc.get("plots"):
        L += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in doc["plots"]] + [""]
    return "\n".join(L)


def write_plots(results: list[dict], out: str) -> list[str]:
    """PNG plots; returns their file names (empty when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in results if r.get("ok")]
    files = []

    pts = [(r["size_on_disk_bytes"] / 1e6, r["perplexity"], r["config"]) for r in ok
           if r.get("size_on_disk_bytes") and math.isfinite(r["perplexity"])]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        for x, y, n in pts:
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front, best = [], float("inf")  # Pareto front: no smaller config has a lower perplexity
        for x, y, _ in sorted(pts):
            if y < best:
                front.append((x, y))
                best = y
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", label="Pareto front")
        ax.legend()
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity vs size on disk")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ppl_vs_size.png"), dpi=110)
    plt.close(fig)
    files.append("ppl_vs_size.png")

    names = [r["config"] for r in ok]

    def paired_bars(fname, title, ylabel, series):
        """One group of two bars per config: series = ((label, values), (label, values))."""
        fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names)), 4))
        for (label, values), shift in zip(series, (-0.2, 0.2)):
            ax.bar([i + shift for i in range(len(names))], values, 0.4, label=label)
        ax.set_xticks(list(range(len(names))), names, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        files.append(fname)

    paired_bars("decode_speed.png", "Decode speed", "decode tokens/s",
                (("batch 1", [r["decode_tokens_per_s"]["1"] for r in ok]),
                 ("batch 8", [r["decode_tokens_per_s"]["8"] for r in ok])))
    paired_bars("peak_memory.png", "Peak memory", "peak RSS (MB)",
                (("load/quantize", [r["peak_rss_load_bytes"] / 1e6 for r in ok]),
                 ("inference", [r["peak_rss_inference_bytes"] / 1e6 for r in ok])))
    return files
