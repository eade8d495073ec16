"""Peak memory of quantize-on-load: a synthetic wide Llama (default ~1.5B parameters, bf16)
is written to disk one layer per shard, then loaded with an hfquant quantization_config
in a fresh process whose memory is measured.

Figures: the process's peak resident set (VmHWM) and the peak of its anonymous memory
(RssAnon sampled every 2 ms: the heap, without the pages of the mmapped checkpoint
files, which the kernel can drop at any time), both above the process's level before
loading (Python, torch, transformers imported). The bound of issue 9: peak growth <=
1.3 x (bytes the quantized model holds + one decoder layer in full precision).

    python benchmarks/bench_memory.py                    # ~1.5B parameters, ~3 GB on disk
    python benchmarks/bench_memory.py --layers 6 --hidden 1024 --intermediate 4096
"""
from __future__ import annotations

import argparse
import json
import os
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
base_rss, base_anon = status("VmRSS"), status("RssAnon")
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
seen, held = set(), 0
for p in list(model.parameters()) + list(model.buffers()):
    if p.data_ptr() not in seen:
        seen.add(p.data_ptr())
        held += p.numel() * p.element_size()
with torch.no_grad():
    ok = bool(torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all())
print(json.dumps({"base_rss": base_rss, "base_anon": base_anon, "peak_rss": status("VmHWM"),
                  "peak_anon": peak["anon"], "model_bytes": held, "load_s": load_s, "finite": ok,
                  "n_quantized": sum(isinstance(m, hfquant.nn.PackedLinear) for m in model.modules())}))
"""


def measure(path: str | os.PathLike, cfg: LlamaConfig, qconfig: dict, threads: int = 2) -> dict:
    """Loads the checkpoint with quantization in a fresh process; returns its memory figures (bytes)."""
    env = {**os.environ, "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(qconfig)], capture_output=True,
                       text=True, env=env, cwd=str(ROOT))
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


def main() -> None:
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
    args = ap.parse_args()
    cfg = synthetic_config(args.layers, args.hidden, args.intermediate, args.vocab, args.heads)
    d = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="hfquant-bench-memory-"))
    try:
        t0 = time.time()
        n = write_checkpoint(d, cfg)
        disk = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        print(f"synthetic Llama: {n / 1e9:.2f}B parameters, {args.layers} layers x hidden {args.hidden} x "
              f"intermediate {args.intermediate}, vocab {args.vocab}; {disk / 2**30:.2f} GiB bf16 on disk "
              f"(written in {time.time() - t0:.0f} s)")
        for q in json.loads(args.configs):
            m = measure(d, cfg, q, args.threads)
            ok = "within" if m["growth_anon"] <= m["bound"] else "ABOVE"
            print(f"{json.dumps(q)}: load {m['load_s']:.1f} s; quantized model holds {_mb(m['model_bytes'])}, "
                  f"one bf16 layer {_mb(m['layer_bytes'])} -> bound 1.3x = {_mb(m['bound'])}; "
                  f"before loading RSS {_mb(m['base_rss'])}; peak growth: anonymous {_mb(m['growth_anon'])} "
                  f"({m['growth_anon'] / m['bound']:.2f} of the bound, {ok}), resident incl. mmapped file pages "
                  f"{_mb(m['growth_rss'])} ({m['growth_rss'] / m['bound']:.2f}); {m['n_quantized']} layers "
                  f"quantized, logits finite: {m['finite']}")
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
