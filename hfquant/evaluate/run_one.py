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
KV_CHUNK = 32  # tokens per step when perplexity runs through a quantized KV cache

# the lm_head untied and quantized at W8 per channel, the embedding in float (the default below 8
# bits quantizes the embedding at 8 bits and the tied head shares it)
HEAD8 = dict(quantize_embeddings=False, modules_to_not_convert=[],
             modules_override={"lm_head": {"bits": 8, "group_size": -1}})
# name -> (kind, settings); hfquant settings are HfQuantConfig arguments
CONFIGS = {
    "fp32": ("plain", {"dtype": "float32"}),
    "bf16": ("plain", {"dtype": "bfloat16"}),
    "w8": ("hfquant", dict(bits=8, group_size=-1)),
    "w4g128": ("hfquant", dict(bits=4, group_size=128)),
    "w4g128f": ("hfquant", dict(bits=4, group_size=128, quantize_embeddings=False)),
    "w4g64": ("hfquant", dict(bits=4, group_size=64)),
    "w4g128a": ("hfquant", dict(bits=4, group_size=128, symmetric=False)),
    "w4g64a": ("hfquant", dict(bits=4, group_size=64, symmetric=False)),
    "w4g128h8": ("hfquant", dict(bits=4, group_size=128, **HEAD8)),
    # round to nearest with the data-free MSE clip search per group (hfquant/methods/rtn_mse.py)
    "mse-w4g128": ("hfquant", dict(bits=4, group_size=128, method="rtn_mse")),
    "mse-w4g32": ("hfquant", dict(bits=4, group_size=32, method="rtn_mse")),
    # calibrated on 16 windows of 512 tokens of WikiText-2 validation (evaluation reads the test split)
    "gptq-w4g128": ("hfquant", dict(bits=4, group_size=128, method="gptq", calibration={"n_samples": 16})),
    "gptq-w4g128a": ("hfquant", dict(bits=4, group_size=128, symmetric=False, method="gptq",
                                     calibration={"n_samples": 16})),
    "llm_int8": ("hfquant", dict(method="llm_int8")),
    "w8a8": ("hfquant", dict(method="w8a8")),
    # SmoothQuant's migration strength chosen on validation text (docs/accuracy.md, defaults-validation)
    "w8a8sq": ("hfquant", dict(method="w8a8", smoothquant_alpha=0.6)),
    # the published schemes: W8A8 without the norm-scale fold, SmoothQuant at the paper's 0.5
    "w8a8-nofold": ("hfquant", dict(method="w8a8", fold_norms=False)),
    "w8a8sq0.5": ("hfquant", dict(method="w8a8", smoothquant_alpha=0.5)),
    "km4": ("hfquant", dict(method="kmeans", bits=4)),
    "km3": ("hfquant", dict(method="kmeans", bits=3)),
    # quantized KV cache (QuantizedKVCache: group 64, newest 128 tokens in full precision):
    # fp32 weights, so the figure is the cache's alone; w4g128kv4 combines it with W4 weights
    "kv8": ("kv", {"dtype": "float32", "kv_cache_bits": 8}),
    "kv4": ("kv", {"dtype": "float32", "kv_cache_bits": 4}),
    "kv2": ("kv", {"dtype": "float32", "kv_cache_bits": 2}),
    "w4g128kv4": ("hfquant", dict(bits=4, group_size=128, kv_cache_bits=4)),
}
PEERS = {
    "torchao": {"torchao-int8": ("torchao", {"weights": "int8"}),
                "torchao-int4g64": ("torchao", {"weights": "int4", "group_size": 64}),
                "torchao-int4g128": ("torchao", {"weights": "int4", "group_size": 128})},
    "quanto": {"quanto-int8": ("quanto", {"weights": "int8"}),
               "quanto-int4": ("quanto", {"weights": "int4"})},
    "bnb": {"bnb-int8": ("bnb", {"load_in_8bit": True}),
            "bnb-nf4": ("bnb", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})},
    "hqq": {"hqq-int4g64": ("hqq", {"nbits": 4, "group_size": 64})},
}
# the module each peer library must provide (checked before its configs run)
PEER_MODULES = {"torchao": "torchao", "quanto": "optimum.quanto", "bnb": "bitsandbytes", "hqq": "hqq"}
# what a user installs for each peer
PEER_PACKAGES = {"torchao": "torchao", "quanto": "optimum-quanto", "bnb": "bitsandbytes", "hqq": "hqq"}
ALL_CONFIGS = dict(CONFIGS, **{k: v for p in PEERS.values() for k, v in p.items()})


# Whether the kernel's RSS high-water mark was reset when this process started (main()).
# ru_maxrss alone is no use there: Linux keeps it across fork and exec, so a worker started
# by a large parent (a test session holding models) would report the parent's size.
_HWM_RESET = False


def _rss_peak_bytes() -> int:
    """Peak resident memory of this process: VmHWM since the reset at start where the kernel
    allows it, else ru_maxrss (which may include the parent's peak at fork)."""
    if _HWM_RESET:
        hwm = _vm_hwm_bytes()
        if hwm is not None:
            return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _trim_heap() -> None:
    """Returns freed heap memory to the system (glibc malloc_trim), so memory the load step
    freed but the allocator kept does not count as the inference figure's."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _vm_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
    if kind == "kv":  # a float model; its generate calls take a QuantizedKVCache (kv_cache_settings)
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
    if kind == "bnb":
        # bitsandbytes' CPU backend; 4-bit computes in bf16
        from transformers import BitsAndBytesConfig

        extra = {"bnb_4bit_compute_dtype": torch.bfloat16} if s.get("load_in_4bit") else {}
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cpu",
                                                    quantization_config=BitsAndBytesConfig(**s, **extra))
    if kind == "hqq":
        from transformers import HqqConfig

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cpu",
                                                    quantization_config=HqqConfig(**s))
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


def kv_cache_settings(model, config_name: str | None = None) -> tuple[int, int, int, str | None] | None:
    """(bits, group_size, residual_length, rotation) of the quantized KV cache this configuration generates
    with: a "kv" configuration's own (group 64, newest 128 tokens in full precision), else the one
    the model's quantization_config asks for; None for neither."""
    from ..kv_cache import kv_cache_settings as saved

    kind, s = ALL_CONFIGS.get(config_name, (None, {}))
    if kind == "kv":
        return s["kv_cache_bits"], 64, 128, s.get("kv_cache_rotation", "auto")
    return saved(model)


def cache_factory(model, kv):
    """A callable making a fresh QuantizedKVCache with the settings ``kv`` (None: no cache given)."""
    if kv is None:
        return None
    from ..kv_cache import QuantizedKVCache

    return lambda: QuantizedKVCache(model.config, *kv)


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
    from .metrics import (decode_speed, model_bytes, perplexity, perplexity_with_cache,
                          prefill_speed, size_on_disk)

    t_start = time.perf_counter()
    name, model_dir = args["config"], args["model_dir"]
    window = int(args.get("window", 512))
    stride = int(args.get("stride") or window)
    res: dict = {"config": name, "kind": ALL_CONFIGS[name][0], "settings": ALL_CONFIGS[name][1],
                 "threads": torch.get_num_threads(), "seconds": {}}
    secs = res["seconds"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    rss_before = _vm_rss_bytes() or _rss_peak_bytes()
    t0 = time.perf_counter()
    model = load(model_dir, name)
    # One forward over one token touches every weight: a plain checkpoint is mmap'd, and its
    # weight pages count as resident only once read, so without this its load peak would
    # leave the weights out.
    with torch.no_grad():
        model(torch.tensor([[tok.bos_token_id if tok.bos_token_id is not None else 0]]))
    secs["load"] = res["load_seconds"] = time.perf_counter() - t0
    res["peak_rss_load_bytes"] = _rss_peak_bytes()
    res["peak_rss_load_method"] = ("VmHWM (reset at process start)" if _HWM_RESET else "ru_maxrss") + \
        " after loading and a one-token forward (imports included)"
    res["rss_after_imports_bytes"] = rss_before
    res["memory_bytes"] = model_bytes(model)

    t0 = time.perf_counter()
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
    secs["save"] = time.perf_counter() - t0

    text = open(args["text_file"], encoding="utf-8").read() if args.get("text_file") else data.wikitext_test()
    text, n_tokens = _prefix(tok, text, args["max_tokens"])
    res["perplexity_tokens"] = n_tokens
    res["perplexity_window"], res["perplexity_stride"] = window, stride
    # Inference peak: freed heap handed back and the kernel's high-water mark reset to the
    # current RSS (model resident, text tokenized) where the kernel allows it.
    _trim_heap()
    res["rss_at_inference_start_bytes"] = _vm_rss_bytes()
    reset = _reset_rss_peak()
    t0 = time.perf_counter()
    kv = kv_cache_settings(model, name)
    res["perplexity"] = None
    if n_tokens < window:
        res["perplexity_na"] = (f"the text has {n_tokens} tokens, fewer than one window of {window}; "
                                "give a longer text (--text) or a smaller --window")
    elif kv is not None:
        # the cache in the loop: windows fed 32 tokens at a time through a fresh quantized cache
        res["perplexity"] = perplexity_with_cache(model, tok, text, cache_factory(model, kv),
                                                  max_length=window, stride=stride, chunk=KV_CHUNK,
                                                  max_tokens=args["max_tokens"])
        res["perplexity_method"] = (f"windows fed {KV_CHUNK} tokens at a time through a QuantizedKVCache "
                                    f"(bits={kv[0]}, group_size={kv[1]}, residual_length={kv[2]})")
    else:
        res["perplexity"] = perplexity(model, tok, text, max_length=window, stride=stride,
                                       max_tokens=args["max_tokens"])
        res["perplexity_method"] = "one forward per window"
    secs["perplexity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reps = args.get("repeats", 3)
    res["prefill_prompt_tokens"] = args["prompt_tokens"]
    res["prefill_tokens_per_s"] = prefill_speed(model, tok, prompt_tokens=args["prompt_tokens"], repeats=reps)
    secs["prefill"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res["decode_new_tokens"] = args["new_tokens"]
    res["decode_tokens_per_s"] = {}
    # energy over the batch-1 decode runs (greedy, new_tokens + 1 tokens after a 32-token prompt)
    rapl0, cpu0, w0 = _rapl_uj(), _cpu_seconds(), time.perf_counter()
    runs = []
    res["decode_tokens_per_s"]["1"] = decode_speed(model, tok, new_tokens=args["new_tokens"], batch=1,
                                                   repeats=reps, on_run=runs.append, cache=cache_factory(model, kv))
    rapl1, cpu1, w1 = _rapl_uj(), _cpu_seconds(), time.perf_counter()
    res["decode_tokens_per_s"]["8"] = decode_speed(model, tok, new_tokens=args["new_tokens"], batch=8,
                                                   repeats=reps, cache=cache_factory(model, kv))
    secs["decode"] = time.perf_counter() - t0
    tokens = (args["new_tokens"] + 1) * reps
    energy = {"tokens": tokens, "wall_seconds": w1 - w0, "cpu_seconds": cpu1 - cpu0,
              "what": f"{reps} batch-1 greedy runs of {args['new_tokens'] + 1} tokens after a 32-token prompt "
                      "(prompt and a 2-token warm-up included)"}
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
                      note=f"ESTIMATE: RAPL not readable; CPU seconds (user+system) of this process x assumed "
                           f"{watts:g} W per busy core")
    energy["joules_per_token"] = energy["joules"] / max(tokens, 1)
    res["energy"] = energy
    hwm = _vm_hwm_bytes()
    if reset and hwm is not None:
        res["peak_rss_inference_bytes"] = hwm
        res["peak_rss_inference_method"] = "VmHWM after malloc_trim and a clear_refs reset"
    else:
        res["peak_rss_inference_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res["peak_rss_inference_method"] = "ru_maxrss of the whole process (load included)"
    secs["total"] = time.perf_counter() - t_start
    return res


def main(argv=None) -> int:
    global _HWM_RESET
    _HWM_RESET = _reset_rss_peak()
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
