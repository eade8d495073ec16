"""What the Hadamard rotation costs in speed on the default model: the online rotation of
down_proj's input (rotation_online=["down_proj"], a forward pre-hook running one
hfquant::hadamard_transform with its 12 x 12 mix per layer) against the offline-only rotation
and no rotation, for W8A8 (where the online rotation pays off in accuracy: docs/accuracy.md,
accuracy-rotation) and RTN W4 g128.

Decode: tokens/s of a greedy generate of 64 tokens after 32 (hfquant.evaluate.decode_speed);
prefill: one forward of 512 tokens (prefill_speed). All models load first; each round times
every config in turn (rotated start), medians of the rounds.

    python benchmarks/bench_rotation_speed.py [--rounds 5] [--write-docs]
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
from hfquant import data  # noqa: E402
from hfquant.evaluate import decode_speed, prefill_speed  # noqa: E402

DOC_INTRO = "# Benchmarks\n"
SCHEMES = [("W8A8", dict(method="w8a8")), ("RTN W4 g128", dict(bits=4, group_size=128))]
ROTATIONS = [("none", {}), ("offline", dict(rotation="hadamard", rotation_online=[])),
             ("offline + online down_proj", dict(rotation="hadamard"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    models = {}
    for sname, scfg in SCHEMES:
        for rname, rcfg in ROTATIONS:
            cfg = hfquant.HfQuantConfig(**scfg, **rcfg)
            models[(sname, rname)] = AutoModelForCausalLM.from_pretrained(md, quantization_config=cfg).eval()
    info = common.system_info(a.threads)
    load0 = common.load_average()
    decode = {k: [] for k in models}
    prefill = {k: [] for k in models}
    keys = list(models)
    for r in range(a.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            decode[k].append(decode_speed(models[k], tok, new_tokens=64, prompt_tokens=32, repeats=1))
            prefill[k].append(prefill_speed(models[k], tok, 512, repeats=1))
    load1 = common.load_average()
    rows = []
    for sname, _ in SCHEMES:
        base_d = statistics.median(decode[(sname, "none")])
        base_p = statistics.median(prefill[(sname, "none")])
        for rname, _ in ROTATIONS:
            d, pf = statistics.median(decode[(sname, rname)]), statistics.median(prefill[(sname, rname)])
            rows.append([sname, rname, f"{d:.1f}", f"{d / base_d:.2f}x", f"{pf:.0f}", f"{pf / base_p:.2f}x"])
    body = "\n".join([
        "### Speed of the Hadamard rotations (offline, online down_proj)", "",
        f"Command: `{command}`", "", common.header_line(info) + ".", "",
        f"Default model (fp32 activations); {a.rounds} rounds, every config in each (rotated start), medians. "
        "Decode: greedy generate of 64 tokens after a 32-token prompt, prefill excluded; prefill: one forward "
        f"of 512 tokens. Load average {load0} at the start, {load1} at the end; run "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, {time.perf_counter() - t_start:.0f} s.", "",
        common.md_table(["scheme", "rotation", "decode tok/s", "vs none", "prefill tok/s (512)", "vs none"], rows),
        "",
        "The offline rotation changes only weights (it unties lm_head from the embedding, the final norm folding "
        "into it; for RTN W4 the untied head gets the default 8 bits of the embedding, so it reads as much as "
        "the shared one); the online one adds per layer a forward pre-hook on down_proj: one "
        "hfquant::hadamard_transform call (signs, the transforms over 128 and the 12 x 12 mix of 1536 = 12 x 128)."])
    print(body)
    if a.write_docs:
        common.write_doc_section(a.docs, "rotation-speed", body, DOC_INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
