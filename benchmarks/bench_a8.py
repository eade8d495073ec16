"""Int8 activations for 4-bit layers (hfquant::qlinear_a8) against the weight-only kernel, in one
process: what they cost in perplexity and what they gain in speed, on the default model.

* perplexity of the default model at W4 g128 with the embedding and tied head at W8, with
  ``hfquant.settings.int8_activations_min_m`` None (weight-only) and 1 (every call with int8
  activations in blocks of 32), WikiText-2 validation (where defaults are chosen) and test;
* the layers of one decoder block, timed per call at M = 1 (decode) and M = 512 (prefill),
  weight-only (qlinear) vs int8 activations (qlinear_a8); at M = 1 cold: the calls rotate
  through copies of the layer larger than twice the L3 cache (at most 512 MiB); medians;
* the model end to end: decode tokens/s (greedy, 64 tokens after 32) and prefill of 512 tokens,
  each setting in turn per round, medians.

    python benchmarks/bench_a8.py [--windows 8] [--rounds 5] [--write-docs]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

import hfquant  # noqa: E402
from hfquant import data, ops  # noqa: E402
from hfquant.evaluate import decode_speed, perplexity, prefill_speed  # noqa: E402

SETTINGS = {"weight-only (qlinear)": None, "int8 activations (qlinear_a8)": 1}


def layer_times(model, rounds: int, l3: int) -> dict[tuple[str, int, str], float]:
    """(layer, M, setting) -> median microseconds per call, cold."""
    from hfquant.nn import QuantLinear

    layers = {n.split(".")[-1]: m for n, m in model.named_modules()
              if isinstance(m, QuantLinear) and (".layers.0." in n)}
    out = {}
    for M in (1, 512):
        for name, mod in layers.items():
            k = mod._kernel()
            # M = 1 reads weights (cold: more than twice the L3, at most 512 MiB of copies); M = 512 computes
            copies = 2 if M > 1 else max(2, min(2 * l3, 512 << 20) // max(1, k["packed_weight"].numel()) + 1)
            packs = [(k["packed_weight"].clone(), k["packed_scales"].clone()) for _ in range(copies)]
            x = torch.randn(M, mod.in_features)
            for fn_name, fn in zip(SETTINGS, (ops.qlinear, ops.qlinear_a8)):
                times = []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    for pw, ps in packs:
                        fn(x, pw, ps, mod.bias, 4, mod.group_size, mod.out_features, mod.in_features)
                    times.append((time.perf_counter() - t0) / len(packs) * 1e6)
                out[(name, M, fn_name)] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    a = p.parse_args(argv)
    command = common.command_line(__file__, argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    md = str(data.default_model_dir("float32"))
    tok = AutoTokenizer.from_pretrained(md)
    cfg = hfquant.HfQuantConfig(bits=4, group_size=128, quantize_embeddings=True,
                                modules_override={"embed_tokens": {"bits": 8}})
    model = AutoModelForCausalLM.from_pretrained(md, quantization_config=cfg).eval()
    info = common.system_info(a.threads)
    load0 = common.load_average()

    ppl = {}
    for name, min_m in SETTINGS.items():
        with hfquant.settings(int8_activations_min_m=min_m):
            for split, text in (("valid", data.wikitext_valid()), ("test", data.wikitext_test())):
                ppl[(name, split)] = perplexity(model, tok, text, max_windows=a.windows)
        print(f"{name}: ppl valid {ppl[(name, 'valid')]:.4f} test {ppl[(name, 'test')]:.4f}", file=sys.stderr,
              flush=True)

    with torch.inference_mode():
        layers = layer_times(model, a.rounds, info.get("l3_bytes") or (32 << 20))
        speed = {name: {"decode": [], "prefill": []} for name in SETTINGS}
        for r in range(a.rounds + 1):
            for name, min_m in SETTINGS.items():
                with hfquant.settings(int8_activations_min_m=min_m):
                    d = decode_speed(model, tok, new_tokens=64, prompt_tokens=32, repeats=1)
                    pf = prefill_speed(model, tok, prompt_tokens=512, repeats=1)
                if r:  # round 0 warms up
                    speed[name]["decode"].append(d)
                    speed[name]["prefill"].append(pf)
    load1 = common.load_average()

    base = next(iter(SETTINGS))
    rows = []
    for name in SETTINGS:
        dec = statistics.median(speed[name]["decode"])
        pre = statistics.median(speed[name]["prefill"])
        bdec = statistics.median(speed[base]["decode"])
        bpre = statistics.median(speed[base]["prefill"])
        rows.append([name, f"{ppl[(name, 'valid')]:.3f}",
                     f"{100 * (ppl[(name, 'valid')] / ppl[(base, 'valid')] - 1):+.2f}%",
                     f"{ppl[(name, 'test')]:.3f}", f"{100 * (ppl[(name, 'test')] / ppl[(base, 'test')] - 1):+.2f}%",
                     f"{dec:.1f} ({dec / bdec:.2f}x)", f"{pre:.0f} ({pre / bpre:.2f}x)"])
    model_table = common.md_table(["setting", "ppl valid", "vs weight-only", "ppl test", "vs weight-only",
                                   "decode tok/s", "prefill 512 tok/s"], rows)
    lrows = []
    for (lname, M, fn_name), us in layers.items():
        if fn_name != base:
            continue
        a8 = layers[(lname, M, "int8 activations (qlinear_a8)")]
        lrows.append([lname, str(M), f"{us:.1f}", f"{a8:.1f}", f"{us / a8:.2f}x"])
    layer_table = common.md_table(["layer (block 0)", "M", "qlinear us/call", "qlinear_a8 us/call",
                                   "speed-up"], lrows)
    body = "\n".join([
        "### Int8 activations for 4-bit layers (qlinear_a8)", "",
        f"Command: `{command}`", "", common.header_line(info) + ".", "",
        "Default model at W4 g128 (group 128, symmetric, grid best) with the embedding and tied head at W8 g128. "
        "int8 activations: every 4-bit layer call with `hfquant.settings.int8_activations_min_m = 1` (x quantized "
        "per row in blocks of 32, max|x| / 127, then integer dot products with the 4-bit codes); the W8 head "
        f"stays weight-only. Perplexity: WikiText-2 validation and test, {a.windows} windows of 512 tokens. "
        f"Decode: 64 greedy tokens after a 32-token prompt; prefill: one forward over 512 tokens; medians of "
        f"{a.rounds} rounds, the settings in turn in each (one warm-up round). Layers: per call, at M = 1 cold "
        f"(rotating through copies larger than twice the L3, at most 512 MiB), medians of {a.rounds}. Load "
        f"average before {load0}, after {load1}; {time.perf_counter() - t_start:.0f} s.", "",
        model_table, "", layer_table])
    print(body)
    if a.write_docs:
        common.write_doc_section(a.docs, "int8-activations", body, "# Benchmarks\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
