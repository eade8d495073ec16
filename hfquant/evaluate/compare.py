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
import time
from pathlib import Path

from tqdm.auto import tqdm

from .run_one import ALL_CONFIGS, CONFIGS, PEER_MODULES, PEER_PACKAGES, PEERS, RESULT_PREFIX

DEFAULT_CONFIGS = "fp32,bf16,w8,w4g128,w4g64a"


def peer_installed(peer: str) -> bool:
    """Whether the peer's library can be found (it may still fail to import or run: the
    worker then reports that error)."""
    try:
        return importlib.util.find_spec(PEER_MODULES[peer]) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def check_model_dir(model_dir: str) -> str:
    """The model type of a causal LM checkpoint directory; ValueError/FileNotFoundError naming
    the problem otherwise (no directory, no config.json, a model that is not a causal LM)."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir} not found")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} has no config.json: not a transformers checkpoint directory")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        cfg = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise ValueError(f"{model_dir}: config.json cannot be read as a transformers config "
                         f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})"
                         ) from None
    mt = getattr(cfg, "model_type", None)
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        archs = ", ".join(getattr(cfg, "architectures", None) or []) or "none listed"
        raise ValueError(f"{model_dir} is not a causal language model (model_type {mt!r}, architectures: {archs}); "
                         "perplexity and generation need one that AutoModelForCausalLM loads")
    return mt


def text_tokens(model_dir: str, text: str | None, max_tokens: int) -> int:
    """Tokens of the text the workers will score (at most max_tokens)."""
    from transformers import AutoTokenizer

    from .. import data

    tok = AutoTokenizer.from_pretrained(model_dir)
    body = open(text, encoding="utf-8").read() if text else data.wikitext_test()
    # a generous character prefix is enough to count up to max_tokens tokens
    return min(max_tokens, len(tok(body[: 64 * max_tokens + 1024]).input_ids))


def parse_configs(configs: str, peers: str | None) -> tuple[list[str], dict[str, str]]:
    """Config names to run, and peer configs skipped (name -> why). ``configs`` may name single
    peer configs too (``torchao-int4g64``); ``peers`` adds all configs of each peer library.
    Unknown names raise ValueError."""
    names = [c.strip() for c in configs.split(",") if c.strip()]
    bad = [c for c in names if c not in ALL_CONFIGS]
    if bad:
        raise ValueError(f"unknown config(s) {', '.join(map(repr, bad))}; valid: {', '.join(ALL_CONFIGS)}")
    if not names:
        raise ValueError(f"no configs given; valid: {', '.join(CONFIGS)}")
    peer_of = {name: p for p, cfgs in PEERS.items() for name in cfgs}
    for p in [p.strip() for p in (peers or "").split(",") if p.strip()]:
        if p not in PEERS:
            raise ValueError(f"unknown peer {p!r}; valid: {', '.join(PEERS)}")
        names += list(PEERS[p])
    run, skipped = [], {}
    for name in dict.fromkeys(names):
        p = peer_of.get(name)
        if p is None or peer_installed(p):
            run.append(name)
        else:
            skipped[name] = (f"peer {p}: {PEER_MODULES[p]} is not installed (pip install {PEER_PACKAGES[p]}); "
                             "the other configs ran")
    return run, skipped


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
            progress: bool = True, window: int = 512, stride: int | None = None,
            command: str | None = None, timeout: float | None = None) -> dict:
    """Run every config in its own process, write report.md, results.json and plots to ``out``.

    Checked before any config runs (a clear error, nothing measured): the config names, the
    model directory (a causal LM checkpoint), the text file. A text shorter than one window
    only makes perplexity n/a (with the reason); a peer library that is not installed is
    listed as n/a; a config whose worker fails is reported with its error; the rest runs.
    """
    names, skipped = parse_configs(configs, peers)
    stride = window if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"window={window} must be >= 2 and stride={stride} in 1..window")
    check_model_dir(model_dir)
    if text is not None and not os.path.isfile(text):
        raise FileNotFoundError(f"text file {text} not found")
    n_tokens = text_tokens(model_dir, text, max_tokens)
    warnings = []
    if n_tokens < window:
        warnings.append(f"the text has {n_tokens} tokens, fewer than one window of {window}: perplexity is n/a; "
                        "the other measurements run")
    worker_args = {"model_dir": os.path.abspath(model_dir), "text_file": os.path.abspath(text) if text else None,
                   "max_tokens": max_tokens, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
                   "repeats": repeats, "threads": threads, "watts_per_core": watts_per_core,
                   "window": window, "stride": stride}
    results = []
    for w in warnings:
        tqdm.write(f"hfquant compare: {w}")
    for name, why in skipped.items():
        tqdm.write(f"hfquant compare: {name} n/a: {why}")
    t0 = time.perf_counter()
    bar = tqdm(names, desc="compare", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        results.append(run_config(name, worker_args, timeout=timeout))
    for name, why in skipped.items():
        results.append({"config": name, "ok": False, "error": why})
    doc = {
        "model_dir": model_dir,  # as given (the report does not spell out the machine's paths)
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _cpu_name(), "cpu_features": _cpu_features(), "python": platform.python_version(),
        "load_average": _loadavg(),
        "wall_seconds": time.perf_counter() - t0,
        "settings": dict({k: v for k, v in worker_args.items() if k != "model_dir"}, timeout_per_config=timeout),
        "text": text or "WikiText-2 test (hfquant.data.wikitext_test)",
        "warnings": warnings,
        "results": results,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    doc["plots"] = write_plots(results, out)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(render_report(doc))
    return doc


def _cpu_features() -> str:
    try:
        from .._ext import _C

        feats = ", ".join(k for k, v in _C.cpu_features().items() if v) or "none"
        return f"{feats}; hfquant kernel path {_C.cpu_isa()}"
    except Exception as exc:  # the report is still written without the extension
        return f"unknown ({type(exc).__name__})"


def _loadavg() -> str | None:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return None


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
    window = s.get("window", 512)
    stride = s.get("stride") or window
    L = ["# hfquant compare", ""]
    if doc.get("command"):
        L += [f"Command: `{doc['command']}`", ""]
    wall = doc.get("wall_seconds")
    L += [f"Model: `{doc['model_dir']}`; {doc['date']}; {doc['machine']} (CPU features: "
          f"{doc.get('cpu_features', 'unknown')}); threads: {', '.join(map(str, threads)) or 'n/a'}; "
          f"load average at the end: {doc.get('load_average') or 'n/a'}; each config measured in a fresh process"
          + (f"; {wall / 60:.1f} min in all." if wall else "."), "",
          f"Text: {doc['text']}, first {s['max_tokens']} tokens. Perplexity: sliding windows of {window} tokens "
          f"every {stride} tokens, each token scored once (the transformers perplexity-guide method; "
          + ("disjoint windows" if stride == window else f"the {window - stride}-token overlap is context only")
          + "); configs with a quantized KV cache feed each window 32 tokens at a time through the quantized "
          "cache, so later tokens attend to quantized keys and values. "
          f"Prefill: one forward over a {s['prompt_tokens']}-token prompt. Decode: greedy, {s['new_tokens']} new "
          f"tokens after a 32-token prompt, prefill excluded. Median of {s['repeats']} repeats. "
          f"Deltas are against **{bname}**.", ""]
    for w in doc.get("warnings") or []:
        L += [f"Warning: {w}.", ""]
    failed = [r for r in res if not r.get("ok")]
    if failed:
        L += ["Not measured (n/a):", ""] + [f"- {r['config']}: {r.get('error')}" for r in failed] + [""]
    no_ppl = [r for r in ok if r.get("perplexity") is None]
    if no_ppl:
        L += ["Perplexity n/a:", ""] + [f"- {r['config']}: {r.get('perplexity_na')}" for r in no_ppl] + [""]

    def table(title, header, rows):
        L.extend([f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
        L.extend("| " + " | ".join(row) + " |" for row in rows)
        L.append("")

    bp = base.get("perplexity") if base else None
    table("Perplexity", ["config", "perplexity", f"vs {bname}"],
          [[r["config"], _num(r.get("perplexity"), "{:.3f}"),
            "n/a" if not bp or r.get("perplexity") is None else f"{100 * (r['perplexity'] / bp - 1):+.2f}%"]
           for r in ok])
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
        L += [f"Load/quantize peak: the process's peak resident memory ({ok[0].get('peak_rss_load_method')}; "
              f"{_mb(ok[0].get('rss_after_imports_bytes'))} MB resident before loading). The forward touches every weight, so a plain checkpoint, which is mmap'd and "
              "whose pages count only once read, is counted in full. Inference peak: "
              f"{ok[0].get('peak_rss_inference_method')}: freed heap is handed back to the system, the kernel's "
              "high-water mark is reset to the resident memory at that point (model, tokenizer, tokenized text, "
              "Python and torch runtime: the 'at start' figures below) and read after perplexity, prefill and "
              "decode; it is the memory inference needs with the model resident, not the activations alone.", ""]
        table("Resident memory at inference start (MB)", ["config", "at start", "peak - start"],
              [[r["config"], _mb(r.get("rss_at_inference_start_bytes")),
                _mb(r["peak_rss_inference_bytes"] - r["rss_at_inference_start_bytes"])
                if r.get("rss_at_inference_start_bytes") else "n/a"] for r in ok])
    be = base["energy"]["joules_per_token"] if base else None
    table("Energy per generated token (batch 1)", ["config", "J/token", f"vs {bname}", "method"],
          [[r["config"], _num(r["energy"]["joules_per_token"], "{:.3f}"), _ratio(r["energy"]["joules_per_token"], be),
            r["energy"]["method"]] for r in ok])
    notes = sorted({r["energy"]["note"] for r in ok})
    L += [f"Energy method: {n}." for n in notes]
    if ok and ok[0]["energy"].get("what"):
        L.append(f"Energy measured over: {ok[0]['energy']['what']}; J/token divides by all tokens generated.")
    L += [""] if notes else []
    if any(r.get("seconds") for r in ok):
        phases = ["load", "save", "perplexity", "prefill", "decode", "total"]
        table("Time per config (s)", ["config"] + phases,
              [[r["config"]] + [_num(r.get("seconds", {}).get(k), "{:.0f}") for k in phases] for r in ok])
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

    # x: size on disk; a config that could not be saved (some peers) is placed at its weights'
    # size in memory, drawn hollow. Broken configs (perplexity over 10x the best) would squash
    # the axis: they are named in the title instead of drawn.
    pts = []
    for r in ok:
        ppl = r.get("perplexity")
        if ppl is None or not math.isfinite(ppl):
            continue
        if r.get("size_on_disk_bytes"):
            pts.append((r["size_on_disk_bytes"] / 1e6, ppl, r["config"], True))
        elif r.get("memory_bytes"):
            pts.append((r["memory_bytes"] / 1e6, ppl, r["config"] + " (in memory)", False))
    best_ppl = min((p[1] for p in pts), default=0.0)
    off = [p for p in pts if p[1] > 10 * best_ppl]
    pts = [p for p in pts if p[1] <= 10 * best_ppl]
    fig, ax = plt.subplots(figsize=(7, 5))
    if pts:
        for on_disk in (True, False):
            sel = [p for p in pts if p[3] == on_disk]
            if sel:
                ax.scatter([p[0] for p in sel], [p[1] for p in sel], facecolors="C0" if on_disk else "none",
                           edgecolors="C0", label="size on disk" if on_disk else "not saveable: size in memory")
        for i, (x, y, n, _) in enumerate(sorted(pts)):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4 + 9 * (i % 3)), fontsize=7)
        front, best = [], float("inf")  # Pareto front: no smaller config has a lower perplexity
        for x, y, _, _ in sorted(pts):
            if y < best:
                front.append((x, y))
                best = y
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", label="Pareto front")
        if max(p[1] for p in pts) > 3 * best_ppl:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    title = "Perplexity vs size"
    if off:
        title += "\nnot shown (perplexity > 10x the best): " + ", ".join(f"{n} ({y:.3g})" for _, y, n, _ in off)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("perplexity")
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
