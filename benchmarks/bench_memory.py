"""Peak memory of quantize-on-load: a synthetic wide Llama (default ~1.5B parameters, bf16)
is written to disk one layer per shard, then loaded with an hfquant quantization_config
in a fresh process whose memory is measured.

Figures, both above the process's level before loading (Python, torch, transformers
imported): the peak of its resident set (VmHWM, the kernel's own high-water mark, read
right after loading: heap plus the mapped pages of the checkpoint files and of shared
libraries), and the peak of its anonymous memory (RssAnon sampled every 2 ms: the heap
alone). The bound of issue 9: peak growth <= 1.3 x (bytes the quantized model holds + one
decoder layer in full precision).

    python benchmarks/bench_memory.py                    # ~1.5B parameters, ~3 GB on disk
    python benchmarks/bench_memory.py --write-docs       # and the table of docs/reliability.md section 6
    python benchmarks/bench_memory.py --layers 6 --hidden 1024 --intermediate 4096
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parent.parent


def synthetic_config(layers: int, hidden: int, intermediate: int, vocab: int, heads: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                       tie_word_embeddings=False, dtype="bfloat16")


def layer_tensors(cfg: LlamaConfig, i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    p = f"model.layers.{i}."
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
              "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
              "mlp.down_proj.weight": (h, f)}
    out = {p + k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    out[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def write_checkpoint(path: str | os.PathLike, cfg: LlamaConfig, seed: int = 0) -> int:
    """Writes the model one layer per shard (never the whole model in memory); returns its parameter count."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    n = cfg.num_hidden_layers
    shards = [{"model.embed_tokens.weight": (torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen) * 0.02)
               .to(torch.bfloat16)}]
    weight_map, total, files = {}, 0, n + 2

    def flush(tensors, k):
        nonlocal total
        name = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel()

    flush(shards[0], 0)
    for i in range(n):
        flush(layer_tensors(cfg, i, gen), i + 1)
    flush({"model.norm.weight": torch.ones(cfg.hidden_size, dtype=torch.bfloat16),
           "lm_head.weight": (torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen) * 0.02).to(torch.bfloat16)},
          n + 1)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(path)
    return total


_CHILD = r"""
import json, os, resource, sys, threading, time
import torch, transformers
import hfquant

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
if len(sys.argv) > 3:
    # warm-up: load a tiny model the same way first, so that what any first load costs once
    # (modules imported on first use, shared-library code pages, thread pools) is in the baseline
    import gc
    warm = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[3], quantization_config=hfquant.HfQuantConfig(
        **json.loads(sys.argv[2])))
    del warm
    gc.collect()
    hfquant.quantizer.release_freed_memory()
try:  # reset the high-water mark to the current RSS (Linux >= 4.0), so that the imports' peak does not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    hwm_reset = True
except OSError:
    hwm_reset = False
base_rss, base_anon, base_file = status("VmRSS"), status("RssAnon"), status("RssFile")
peak = {"anon": base_anon}
done = threading.Event()

def sample():
    while not done.is_set():
        peak["anon"] = max(peak["anon"], status("RssAnon"))
        time.sleep(0.002)

t = threading.Thread(target=sample, daemon=True)
t.start()
t0 = time.time()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=hfquant.HfQuantConfig(
    **json.loads(sys.argv[2])))
load_s = time.time() - t0
done.set()
t.join()
peak["anon"] = max(peak["anon"], status("RssAnon"))
peak_rss, rss_file = status("VmHWM"), status("RssFile")  # before the forward below touches anything
seen, held = set(), 0
for p in list(model.parameters()) + list(model.buffers()):
    if p.data_ptr() not in seen:
        seen.add(p.data_ptr())
        held += p.numel() * p.element_size()
with torch.no_grad():
    ok = bool(torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all())
print(json.dumps({"base_rss": base_rss, "base_anon": base_anon, "base_file": base_file, "peak_rss": peak_rss,
                  "peak_anon": peak["anon"], "rss_file": rss_file, "hwm_reset": hwm_reset, "model_bytes": held,
                  "load_s": load_s, "finite": ok,
                  "n_quantized": sum(isinstance(m, hfquant.nn.PackedLinear) for m in model.modules())}))
"""


def write_warmup_checkpoint(path: str | os.PathLike) -> None:
    """A one-layer model of the same architecture (hidden 256), for measure(warmup=...)."""
    write_checkpoint(path, synthetic_config(layers=1, hidden=256, intermediate=1024, vocab=1024, heads=4))


def measure(path: str | os.PathLike, cfg: LlamaConfig, qconfig: dict, threads: int = 2,
            warmup: str | os.PathLike | None = None) -> dict:
    """Loads the checkpoint with quantization in a fresh process; returns its memory figures (bytes).
    With warmup (a checkpoint of write_warmup_checkpoint), that model is loaded first and the
    baseline taken after it: the figures leave out the one-off costs of a process's first load."""
    env = {**os.environ, "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    argv = [sys.executable, "-c", _CHILD, str(path), json.dumps(qconfig)] + ([str(warmup)] if warmup else [])
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if r.returncode:
        raise RuntimeError(f"the measuring process failed:\n{r.stderr[-4000:]}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    h, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    m["layer_bytes"] = 2 * (2 * h * h + 2 * kv * h + 3 * h * f + 2 * h)  # one decoder layer in bf16
    m["bound"] = 1.3 * (m["model_bytes"] + m["layer_bytes"])
    m["growth_rss"] = m["peak_rss"] - m["base_rss"]
    m["growth_anon"] = m["peak_anon"] - m["base_anon"]
    return m


def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def _label(q: dict) -> str:
    if q.get("method", "rtn") == "rtn" and set(q) <= {"bits", "group_size", "method"}:
        gs = q.get("group_size", 128)
        return f"w{q['bits']}" + (" per channel" if gs == -1 else f"g{gs}")
    return json.dumps(q)


DOC_INTRO = "# Reliability and security\n"


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common  # shared by the benchmarks (not imported by the test that reuses this file)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory, removed after)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default='[{"bits": 4, "group_size": 128}, {"bits": 8, "group_size": -1}]',
                    help="JSON list of HfQuantConfig arguments to measure")
    ap.add_argument("--warmup", action="store_true",
                    help="load a one-layer model first and take the baseline after it (leaves out one-off costs)")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/reliability.md")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "reliability.md")
    args = ap.parse_args()
    command = "python benchmarks/bench_memory.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cfg = synthetic_config(args.layers, args.hidden, args.intermediate, args.vocab, args.heads)
    d = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="hfquant-bench-memory-"))
    rows = []
    try:
        t0 = time.time()
        n = write_checkpoint(d, cfg)
        disk = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        model_line = (f"Synthetic Llama: {n / 1e9:.2f}B parameters ({args.layers} layers, hidden {args.hidden}, "
                      f"intermediate {args.intermediate}, vocab {args.vocab}, untied lm_head), "
                      f"{disk / 2**30:.2f} GiB bf16 on disk")
        print(f"{model_line} (written in {time.time() - t0:.0f} s)", flush=True)
        if args.warmup:
            write_warmup_checkpoint(d / "warmup")
        for q in json.loads(args.configs):
            m = measure(d, cfg, q, args.threads, warmup=d / "warmup" if args.warmup else None)
            ra, rr = m["growth_anon"] / m["bound"], m["growth_rss"] / m["bound"]
            print(f"{json.dumps(q)}: load {m['load_s']:.1f} s; quantized model holds {_mb(m['model_bytes'])}, "
                  f"one bf16 layer {_mb(m['layer_bytes'])} -> bound 1.3x = {_mb(m['bound'])}; "
                  f"before loading RSS {_mb(m['base_rss'])}; peak growth: anonymous {_mb(m['growth_anon'])} "
                  f"({ra:.2f} of the bound, {'within' if ra <= 1 else 'ABOVE'}), resident (VmHWM, incl. mapped "
                  f"file pages) {_mb(m['growth_rss'])} ({rr:.2f}, {'within' if rr <= 1 else 'ABOVE'}); "
                  f"file pages resident after loading {_mb(m['rss_file'] - m['base_file'])} above the start; "
                  f"{m['n_quantized']} layers quantized, logits finite: {m['finite']}", flush=True)
            rows.append([_label(q), f"{m['load_s']:.0f} s", _mb(m["model_bytes"]), _mb(m["bound"]),
                         f"{_mb(m['growth_anon'])} ({ra:.2f} x)", f"{_mb(m['growth_rss'])} ({rr:.2f} x)",
                         _mb(m["rss_file"] - m["base_file"])])
            base_rss, hwm_reset = m["base_rss"], m["hwm_reset"]
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)
    table = common.md_table(["config", "load", "quantized model holds", "+ one bf16 layer, x 1.3 (bound)",
                             "peak heap growth (RssAnon)", "peak resident growth (VmHWM)",
                             "file pages resident after loading"], rows)
    body = "\n".join([
        f"Command: `{command.strip()}` (`make bench-memory`); {args.threads} threads, {common.cpu_model()}; "
        f"run {time.strftime('%Y-%m-%d', time.gmtime())}.", "",
        f"{model_line}. The process held {_mb(base_rss)} before loading (Python, torch, transformers"
        + ("; a one-layer model loaded and dropped first" if args.warmup else "") + "); "
        + ("its VmHWM was reset to that level (`/proc/self/clear_refs` 5)." if hwm_reset else
           "its VmHWM could not be reset, so the resident peak includes the imports'."), "",
        table, "",
        "Growth = peak minus the level before loading; x = fraction of the bound. The last column is the growth "
        "of RssFile (mapped file pages: the checkpoint and shared libraries) when loading has finished."])
    print(body)
    if args.write_docs:
        common.write_doc_section(args.docs, "bench-memory", body, DOC_INTRO)


if __name__ == "__main__":
    main()
