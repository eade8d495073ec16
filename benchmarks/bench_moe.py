"""MoE decode and prefill on a CPU: hfquant's W4 experts against transformers fp32 and bf16.

A 2-layer Qwen3-MoE with Qwen3-30B-A3B's expert shapes (hidden 2048, moe_intermediate 768, 128
experts, top-8, 32 query / 4 KV heads of 128), random weights (std 0.02), a small vocabulary
(4096) so the experts dominate. The same float model runs as transformers fp32 eager, bf16
eager, and hfquant W4 g128 (every linear layer and the fused experts, hfquant.nn.QuantExperts
on hfquant::qlinear_routed; router and lm_head kept). Rounds interleave the three; medians.

* decode: batch 1, each step one token after a 32-token prompt (a DynamicCache), the time of a
  forward of one token; tokens/s = 1 / median step;
* prefill: one forward of 512 tokens, tokens/s;
* bytes read per decode token: the routed experts' weights (top-8 of 128 per layer) plus the
  attention and router weights; against a same-run DRAM read probe (common.measure_bandwidth)
  that gives the share of the machine's read rate the W4 step reaches;
* the experts alone: the time of the experts modules' forward within the decode steps (hooks)
  against the bytes of the experts each step routes to (8 distinct of 128 per layer), as a
  share of the same DRAM probe;
* memory: the bytes of each model's parameters and buffers.

The row "w4g128 a8" is the same W4 model with hfquant.settings(int8_activations_min_m=16):
calls of at least 16 tokens (the prefill, not the decode) run with int8 activations
(hfquant::qlinear_a8 / qlinear_routed_a8).

    python benchmarks/bench_moe.py                      # print
    python benchmarks/bench_moe.py --write-docs         # docs/benchmarks.md, section moe-decode
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, Qwen3MoeConfig, Qwen3MoeForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

import hfquant  # noqa: E402
from hfquant.nn import QuantExperts  # noqa: E402

DOC_INTRO = "# Benchmarks\n"
SHAPES = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
              num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
              vocab_size=4096, norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=4096)
PROMPT = 32


def build(layers: int, seed: int) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(**SHAPES, num_hidden_layers=layers)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.model.rotary_emb.__init__(config)  # its inv_freq buffer, which to_empty left unset
    return model.eval()


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.device.type != "meta":
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def decode_read_bytes(model) -> int:
    """Weight bytes one decode token reads in the decoder layers: all of them but the experts
    the router did not pick (top-k of E per layer, each expert the same size); not the head."""
    k, E = SHAPES["num_experts_per_tok"], SHAPES["num_experts"]
    experts = sum(model_bytes(m) for m in _experts_modules(model))
    return model_bytes(model.model.layers) - experts * (E - k) // E


def _experts_modules(model) -> list:
    """The experts modules of the decoder layers (hfquant's QuantExperts or transformers' *Experts)."""
    return [m for m in model.model.layers.modules() if isinstance(m, QuantExperts) or type(m).__name__.endswith("Experts")]


def _expert_bytes(m) -> int:
    """Bytes of one expert of an experts module (every expert the same size)."""
    E = SHAPES["num_experts"]
    return sum(t.numel() * t.element_size() for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
               if t.dim() >= 3 and t.shape[0] == E) // E


class ExpertsTimer:
    """Accumulates the wall time of the experts modules' forward and the bytes of the experts
    each call routes to (its distinct expert ids), while enabled."""

    def __init__(self, model):
        self.on, self.seconds, self.bytes, self._t0 = False, 0.0, 0, 0.0
        self.handles = []
        for m in _experts_modules(model):
            per = _expert_bytes(m)
            self.handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(m.register_forward_hook(lambda mod, a, k, out, per=per: self._post(a, k, per),
                                                        with_kwargs=True))

    def _pre(self, module, args, kwargs):
        if self.on:
            self._t0 = time.perf_counter()

    def _post(self, args, kwargs, per):
        if self.on:
            self.seconds += time.perf_counter() - self._t0
            idx = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            self.bytes += int(idx.unique().numel()) * per


@torch.no_grad()
def decode_step_times(model, ids, steps: int, timer: ExpertsTimer | None = None) -> list[float]:
    cache = DynamicCache(config=model.config)
    model(ids[:, :PROMPT], cache=cache, use_cache=True)
    out = []
    for i in range(steps):
        tok = ids[:, PROMPT + i:PROMPT + i + 1]
        if timer is not None:
            timer.on = True
        t0 = time.perf_counter()
        model(tok, cache=cache, use_cache=True)
        out.append(time.perf_counter() - t0)
        if timer is not None:
            timer.on = False
    return out


@torch.no_grad()
def prefill_time(model, ids) -> float:
    t0 = time.perf_counter()
    model(ids)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per round and model")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default="fp32,bf16,w4g128,w4g128-a8")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    a = p.parse_args(argv)
    command = common.command_line(__file__, argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    load_start = common.load_average()

    base = build(a.layers, seed=0)
    models, quantize_s, w4 = {}, None, None
    knobs = {}  # hfquant.settings per config
    for name in a.configs.split(","):
        if name == "fp32":
            models[name] = base
        elif name == "bf16":
            models[name] = copy.deepcopy(base).to(torch.bfloat16)
        elif name in ("w4g128", "w4g128-a8"):
            if w4 is None:
                t0 = time.perf_counter()
                w4 = hfquant.quantize_model(copy.deepcopy(base), hfquant.HfQuantConfig(bits=4, group_size=128))
                quantize_s = time.perf_counter() - t0
                n_experts = sum(isinstance(m, QuantExperts) for m in w4.modules())
                if n_experts != a.layers:
                    raise SystemExit(f"w4g128: {n_experts} QuantExperts modules, expected {a.layers}")
            models[name] = w4
            knobs[name] = {"int8_activations_min_m": 16 if name.endswith("-a8") else None}
        else:
            raise SystemExit(f"unknown config {name!r} (use fp32, bf16, w4g128, w4g128-a8)")
    if "fp32" not in a.configs.split(","):
        del base

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPES["vocab_size"], (1, max(a.prefill, PROMPT + a.steps)), generator=g)
    steps = {n: [] for n in models}
    prefill = {n: [] for n in models}
    timers = {id(m): ExpertsTimer(m) for m in models.values()}  # one per model object
    experts = {n: [0.0, 0] for n in models}  # per config: experts' seconds and bytes in the timed steps
    for name, m in models.items():  # warm-up: packing, allocator, thread pool
        with hfquant.settings(**knobs.get(name, {})):
            decode_step_times(m, ids, 2)
            prefill_time(m, ids[:, :a.prefill])
    bandwidth = []
    for _ in range(a.rounds):
        for name, m in models.items():
            timer = timers[id(m)]
            s0, b0 = timer.seconds, timer.bytes
            with hfquant.settings(**knobs.get(name, {})):
                steps[name] += decode_step_times(m, ids, a.steps, timer)
                prefill[name].append(prefill_time(m, ids[:, :a.prefill]))
            experts[name][0] += timer.seconds - s0
            experts[name][1] += timer.bytes - b0
        bandwidth.append(common.measure_bandwidth(1 << 30, 3)["best"])
    load_end = common.load_average()

    probe = statistics.median(bandwidth)
    rows, res = [], {}
    for name, m in models.items():
        step = statistics.median(steps[name])
        res[name] = dict(decode=1 / step, prefill=a.prefill / statistics.median(prefill[name]),
                         bytes=model_bytes(m), read=decode_read_bytes(m),
                         experts=experts[name][1] / experts[name][0] / 1e9 if experts[name][0] else float("nan"))
    ref = res.get("fp32")
    for name, r in res.items():
        rate = r["read"] / (1 / r["decode"]) / 1e9
        rows.append([name, f"{r['decode']:.2f}", "" if ref is None else f"{r['decode'] / ref['decode']:.2f}x",
                     f"{r['prefill']:.1f}", "" if ref is None else f"{r['prefill'] / ref['prefill']:.2f}x",
                     f"{r['read'] / 2**20:.1f}", f"{rate:.1f} ({100 * rate / probe:.0f}%)",
                     f"{r['experts']:.1f} ({100 * r['experts'] / probe:.0f}%)",
                     f"{r['bytes'] / 2**20:.0f}",
                     "" if "bf16" not in res else f"{r['bytes'] / res['bf16']['bytes']:.2f}x"])
    info = common.system_info(a.threads)
    header = ["config", "decode tok/s (batch 1)", "vs fp32", f"prefill tok/s ({a.prefill})", "vs fp32",
              "weights read per token MiB", "read GB/s (of the DRAM probe)",
              "experts alone: routed bytes GB/s (of the probe)", "model MiB", "vs bf16"]
    body = "\n".join([
        "### MoE decode and prefill (Qwen3-30B-A3B expert shapes)", "",
        f"Command: `{command}`", "", common.header_line(info) + ".", "",
        f"A {a.layers}-layer Qwen3-MoE, hidden 2048, 128 experts of moe_intermediate 768, top-8 (normalized), "
        "32 query / 4 KV heads of 128, vocabulary 4096, random weights (std 0.02); transformers eager in fp32 and "
        "bf16, and hfquant W4 g128 (linear layers and fused experts; router and lm_head kept; \"w4g128 a8\": the "
        "same model with int8 activations for calls of at least 16 tokens, hfquant.settings(int8_activations_min_m=16)"
        + (f"; quantized in {quantize_s:.0f} s" if quantize_s is not None else "") + "). "
        f"{a.rounds} interleaved rounds; decode: median of {a.rounds * a.steps} one-token steps after a "
        f"{PROMPT}-token prompt; prefill: median of {a.rounds} forwards of {a.prefill} tokens. Weights read per "
        "token: the routed experts' share (8 of 128) of the experts' bytes plus the attention and router "
        f"weights; experts alone: the bytes of the experts each decode step routes to (8 distinct per layer) over "
        f"the time of the experts modules' forward in those steps; DRAM probe: {probe:.1f} GB/s (median of the "
        "rounds' read probes over 1 GiB). Load average "
        f"{load_start} at the start, {load_end} at the end; run {time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"{time.perf_counter() - t_start:.0f} s.", "",
        common.md_table(header, rows)])
    print(body)
    if a.write_docs:
        common.write_doc_section(a.docs, "moe-decode", body, DOC_INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
