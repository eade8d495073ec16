"""Measure one configuration in this (fresh) process; used by `hfquant compare`.

    python -m hfquant.evaluate.run_one '{"model_dir": ..., "config": "w4g128", ...}'

Prints one line ``HFQUANT_RESULT {json}`` on stdout (other output may precede it). A fresh
process per configuration keeps the peak RSS of one configuration out of the next one's.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import resource
import sys
import tempfile
import time

RESULT_PREFIX = "HFQUANT_RESULT "

HEAD8 = dict(modules_to_not_convert=[], modules_override={"lm_head": {"bits": 8, "group_size": -1}})
# name -> (kind, settings); hfquant settings are HfQuantConfig arguments
CONFIGS = {
    "fp32": ("plain", {"dtype": "float32"}),
    "bf16": ("plain", {"dtype": "bfloat16"}),
    "w8": ("hfquant", dict(bits=8, group_size=-1)),
    "w4g128": ("hfquant", dict(bits=4, group_size=128)),
    "w4g64": ("hfquant", dict(bits=4, group_size=64)),
    "w4g128a": ("hfquant", dict(bits=4, group_size=128, symmetric=False)),
    "w4g64a": ("hfquant", dict(bits=4, group_size=64, symmetric=False)),
    "w4g128h8": ("hfquant", dict(bits=4, group_size=128, **HEAD8)),
    "llm_int8": ("hfquant", dict(method="llm_int8")),
    "w8a8": ("hfquant", dict(method="w8a8")),
    "w8a8sq": ("hfquant", dict(method="w8a8", smoothquant_alpha=0.5)),
    "km4": ("hfquant", dict(method="kmeans", bits=4)),
    "km3": ("hfquant", dict(method="kmeans", bits=3)),
}
PEERS = {
    "torchao": {"torchao-int8": ("torchao", {"weights": "int8"}),
                "torchao-int4g64": ("torchao", {"weights": "int4", "group_size": 64}),
                "torchao-int4g128": ("torchao", {"weights": "int4", "group_size": 128})},
    "quanto": {"quanto-int8": ("quanto", {"weights": "int8"}),
               "quanto-int4": ("quanto", {"weights": "int4"})},
}
ALL_CONFIGS = dict(CONFIGS, **{k: v for p in PEERS.values() for k, v in p.items()})


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rapl_uj() -> dict[str, tuple[int, int]] | None:
    """Package energy counters (µJ) and their wrap ranges, or None if not readable."""
    out = {}
    for d in sorted(glob.glob("/sys/class/powercap/intel-rapl:[0-9]*")):
        if d.count(":") != 1:  # packages only; sub-zones (core, dram) are inside them
            continue
        try:
            e = int(open(os.path.join(d, "energy_uj")).read())
            try:
                rng = int(open(os.path.join(d, "max_energy_range_uj")).read())
            except (OSError, ValueError):
                rng = 0
            out[d] = (e, rng)
        except (OSError, ValueError):
            return None
    return out or None


def load(model_dir: str, name: str):
    import torch
    from transformers import AutoModelForCausalLM

    kind, s = ALL_CONFIGS[name]
    if kind == "plain":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, s["dtype"]))
    if kind == "hfquant":
        import hfquant

        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=hfquant.HfQuantConfig(**s))
    if kind == "torchao":
        # torchao's own quantize_ on the loaded bf16 model: its CPU int4 layout needs the
        # version-1 config, which transformers' TorchAoConfig path does not convert on load
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        if s["weights"] == "int8":
            cfg = Int8WeightOnlyConfig()
        else:
            from torchao.dtypes import Int4CPULayout
            from torchao.quantization import Int4WeightOnlyConfig

            cfg = Int4WeightOnlyConfig(group_size=s["group_size"], layout=Int4CPULayout(), version=1)
        quantize_(model, cfg)
        return model
    if kind == "quanto":
        from transformers import QuantoConfig

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                    quantization_config=QuantoConfig(weights=s["weights"]))
    raise ValueError(f"run_one: unknown config kind {kind!r}")


def _prefix(tok, text: str, max_tokens: int) -> tuple[str, int]:
    """The text cut after its first ``max_tokens`` tokens (perplexity() cuts the ids again)."""
    enc = tok(text, return_offsets_mapping=True) if tok.is_fast else None
    if enc is None:
        return text, min(max_tokens, len(tok(text).input_ids))
    n = min(max_tokens, len(enc["input_ids"]))
    # a few characters of slack so that re-tokenizing the prefix reproduces the last token
    return text[: enc["offset_mapping"][n - 1][1] + 16], n


def _why(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}"


def run(args: dict) -> dict:
    """Load (quantize) one configuration and measure it; see `hfquant compare` for the fields."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))

    from transformers import AutoTokenizer

    from .. import data
    from .metrics import _prompt_ids, decode_speed, model_bytes, perplexity, prefill_speed, size_on_disk

    name, model_dir = args["config"], args["model_dir"]
    res: dict = {"config": name, "kind": ALL_CONFIGS[name][0], "settings": ALL_CONFIGS[name][1],
                 "threads": torch.get_num_threads()}
    tok = AutoTokenizer.from_pretrained(model_dir)
    rss_before = _rss_peak_bytes()
    t0 = time.perf_counter()
    model = load(model_dir, name)
    res["load_seconds"] = time.perf_counter() - t0
    res["peak_rss_load_bytes"] = _rss_peak_bytes()
    res["rss_after_imports_bytes"] = rss_before
    res["memory_bytes"] = model_bytes(model)

    try:
        with tempfile.TemporaryDirectory(prefix="hfquant-compare-") as tmp:
            model.save_pretrained(tmp)
            n = size_on_disk(tmp)
            if n == 0:
                raise RuntimeError("save_pretrained wrote no .safetensors file")
            res["size_on_disk_bytes"] = n
    except Exception as exc:  # a peer that cannot save is reported, not fatal
        res["size_on_disk_bytes"] = None
        res["size_on_disk_na"] = _why(exc)

    text = open(args["text_file"], encoding="utf-8").read() if args.get("text_file") else data.wikitext_test()
    text, n_tokens = _prefix(tok, text, args["max_tokens"])
    # inference peak: reset the high-water mark after loading (and after tokenizing the whole
    # text, which is not inference) where the kernel allows it
    reset = _reset_rss_peak()
    res["perplexity"] = perplexity(model, tok, text, max_length=512, stride=512, max_tokens=args["max_tokens"])
    res["perplexity_tokens"] = n_tokens
    reps = args.get("repeats", 3)
    res["prefill_prompt_tokens"] = args["prompt_tokens"]
    res["prefill_tokens_per_s"] = prefill_speed(model, tok, prompt_tokens=args["prompt_tokens"], repeats=reps)
    res["decode_new_tokens"] = args["new_tokens"]
    res["decode_tokens_per_s"] = {}
    for b in (1, 8):
        res["decode_tokens_per_s"][str(b)] = decode_speed(model, tok, new_tokens=args["new_tokens"], batch=b,
                                                          repeats=reps)

    # energy of one batch-1 greedy decode of new_tokens after a 32-token prompt
    ids = _prompt_ids(tok, 32)
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id, max_new_tokens=args["new_tokens"],
              min_new_tokens=args["new_tokens"])
    rapl0, cpu0, w0 = _rapl_uj(), _cpu_seconds(), time.perf_counter()
    with torch.no_grad():
        model.generate(ids, **kw)
    rapl1, cpu1, w1 = _rapl_uj(), _cpu_seconds(), time.perf_counter()
    energy = {"tokens": args["new_tokens"], "wall_seconds": w1 - w0, "cpu_seconds": cpu1 - cpu0}
    if rapl0 and rapl1 and rapl0.keys() == rapl1.keys():
        uj = 0
        for k, (e0, rng) in rapl0.items():
            d = rapl1[k][0] - e0
            uj += d + rng if d < 0 and rng else d
        energy.update(method="rapl", estimate=False, joules=uj / 1e6,
                      note="RAPL package counters: the whole package(s), other processes included")
    else:
        watts = float(args.get("watts_per_core", 10.0))
        energy.update(method="estimate", estimate=True, joules=(cpu1 - cpu0) * watts, watts_per_core=watts,
                      note=f"ESTIMATE: RAPL not readable; CPU seconds (user+system) x assumed {watts:g} W "
                           "per busy core")
    energy["joules_per_token"] = energy["joules"] / max(args["new_tokens"], 1)
    res["energy"] = energy
    hwm = _vm_hwm_bytes()
    if reset and hwm is not None:
        res["peak_rss_inference_bytes"], res["peak_rss_inference_method"] = hwm, "VmHWM after clear_refs reset"
    else:
        res["peak_rss_inference_bytes"] = _rss_peak_bytes()
        res["peak_rss_inference_method"] = "ru_maxrss of the whole process (load included)"
    return res


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = json.loads(argv[0])
    try:
        res = run(args)
        res["ok"] = True
    except Exception as exc:
        res = {"config": args.get("config"), "ok": False, "error": _why(exc)}
    sys.stdout.write(RESULT_PREFIX + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
