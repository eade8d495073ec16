"""Command line: `hfquant quantize MODEL_DIR OUT_DIR --bits 4 --group-size 128` (or
`--method gptq|awq`, `--method llm_int8|w8a8 [--smoothquant-alpha A]`, or `--method kmeans --bits 4`), `hfquant info DIR`,
`hfquant verify DIR`, `hfquant eval MODEL_DIR [--config w4g128]`, `hfquant compare MODEL_DIR --configs fp32,w8,w4g128`,
`hfquant export MODEL_DIR OUT_DIR --format gptq|compressed-tensors`, `hfquant convert IN_DIR OUT_DIR`."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

# Nothing here imports torch or transformers at module level: `--help` and the path checks
# answer before they load (hfquant/__init__.py defers them while the command starts).


def _check_model_dir(path: str) -> None:
    """A model folder given on the command line: it exists and holds config.json."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"hfquant: model folder {path} not found")
    if not os.path.isdir(path):
        raise ValueError(f"hfquant: {path} is a file, not a model folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"hfquant: {path} has no config.json (not a transformers model folder)")


def _check_input_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"hfquant: {what} {path} not found")


def _check_output(path: str, folder: bool) -> None:
    """An output (a folder, or a file): not something of the other kind, and the nearest folder on
    its way that exists is writable (a save writes beside the output, then renames)."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"hfquant: output {path} is an existing file, not a folder")
    if not folder and os.path.isdir(path):
        raise ValueError(f"hfquant: output {path} is a folder, not a file")
    where = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise ValueError(f"hfquant: output {path} cannot be created: {where} is a file")
    if not os.access(where, os.W_OK | os.X_OK):
        raise PermissionError(f"hfquant: output {path} cannot be written: {where} is not writable")


# per command: (argument, what it is); checked before anything loads
_PATHS = {
    "quantize": [("model_dir", "model"), ("out_dir", "out_folder"), ("calib_text", "text"), ("plot_bits", "out_file")],
    "eval": [("model_dir", "model"), ("text", "text"), ("json", "out_file")],
    "info": [("model_dir", "model"), ("plot_bits", "out_file")],
    "export": [("model_dir", "model"), ("out_dir", "out_folder")],
    "convert": [("in_dir", "model"), ("out_dir", "out_folder")],
    "compare": [("model_dir", "model"), ("text", "text"), ("out", "out_folder")],
}


def _check_paths(args) -> None:
    for attr, kind in _PATHS.get(args.cmd, []):
        path = getattr(args, attr, None)
        if path is None:
            continue
        if kind == "model":
            _check_model_dir(path)
        elif kind == "text":
            _check_input_file(path, "text file")
        else:
            _check_output(path, folder=kind == "out_folder")


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {v!r}")
    return n


def _one_line(exc: BaseException) -> str:
    """The message of an error as one line, without the "hfquant: " its raiser put first."""
    msg = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return msg[len("hfquant: "):] if msg.startswith("hfquant: ") else msg


def _cmd_quantize(args) -> int:
    if os.path.exists(args.out_dir) and os.path.exists(args.model_dir) and os.path.samefile(args.out_dir,
                                                                                          args.model_dir):
        print(f"hfquant quantize: the output folder {args.out_dir} is the input model folder {args.model_dir}: "
              "saving would replace the model it reads; choose another output folder", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfquant

    extra = _method_settings(args)
    if args.quantize_embeddings is not None:
        extra["quantize_embeddings"] = args.quantize_embeddings
    if args.rotation is not None:
        extra.update(rotation=args.rotation, rotation_seed=args.rotation_seed,
                     rotation_online=[] if args.rotation_online == "none" else [args.rotation_online])
    group_size = args.group_size if args.group_size is not None else default_group_size(args.method, args.bits)
    cfg = hfquant.HfQuantConfig(bits=args.bits, group_size=group_size, symmetric=not args.asymmetric,
                                method=args.method,
                                modules_to_not_convert=args.skip if args.skip is not None else None, **extra)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=cfg)
    hfquant.save_pretrained(model, args.out_dir)
    try:
        hfquant.save_pretrained(AutoTokenizer.from_pretrained(args.model_dir), args.out_dir)
    except (OSError, ValueError) as exc:
        print(f"note: no tokenizer copied ({exc})", file=sys.stderr)
    print(f"wrote {args.out_dir} ({cfg.short_name})")
    return _cmd_info(argparse.Namespace(model_dir=args.out_dir, json=False, plot_bits=args.plot_bits))


def _cmd_verify(args) -> int:
    from .verify import verify_checkpoint

    try:
        result = verify_checkpoint(args.model_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"hfquant verify: {str(exc).removeprefix('hfquant: ')}", file=sys.stderr)
        return 2
    print(result.message, file=sys.stdout if result else sys.stderr)
    return result.status


def _cmd_info(args) -> int:
    from .evaluate import size_on_disk

    path = args.model_dir
    config = _read_config(path)
    q = config.get("quantization_config")
    headers = _safetensors_headers(path)
    info = {"path": path, "size_on_disk_bytes": size_on_disk(path), "architectures": config.get("architectures")}
    if not q or q.get("quant_method") != "hfquant":
        info["quantization"] = None if not q else q.get("quant_method")
    else:
        kept, quantized = set(), set()
        for shapes in headers.values():
            quantized |= {k[: -len(".qweight")] for k in shapes if k.endswith(".qweight")}
            # 2-D float weights are the matrices kept in full precision (norms are 1-D)
            kept |= {k[: -len(".weight")] for k, shape in shapes.items() if k.endswith(".weight") and len(shape) == 2}
        kept -= quantized
        experts = {k[: -len(".gate_up_qweight")] for shapes in headers.values() for k in shapes
                   if k.endswith(".gate_up_qweight")}
        info.update({
            "scheme": _saved_method(q).describe(q),
            "method": q.get("method"), "bits": q.get("bits"), "group_size": q.get("group_size"),
            "symmetric": q.get("symmetric"), "format_version": q.get("format_version"),
            "modules_to_not_convert": q.get("modules_to_not_convert"),
            "modules_override": q.get("modules_override") or {},
            # the method's own settings, as saved
            **{k: q[k] for k in _saved_method(q).setting_names() if k in q},
            **({"quantize_embeddings": True, "tied_modules": q.get("tied_modules") or {}}
               if q.get("quantize_embeddings") else {}),
            "quantized_layers": len(quantized),
            "quantized_expert_modules": len(experts),
            "full_precision_matrices": sorted(kept),
            "unexcluded_float_matrices": _unexcluded_float(headers, q),
        })
        from .evaluate.bits_plot import bits_summary, checkpoint_bits, plot_bits

        entries = checkpoint_bits(path)
        info["bits_per_layer"] = bits_summary(entries)
        if getattr(args, "plot_bits", None):
            info["bits_plot"] = plot_bits(entries, args.plot_bits, title=f"{os.path.basename(os.path.abspath(path))}")
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            if k in ("full_precision_matrices", "unexcluded_float_matrices"):
                print(f"{k}: {len(v)}" + (f" ({', '.join(v[:6])}{', ...' if len(v) > 6 else ''})" if v else ""))
            elif k == "modules_override" and q and _saved_method(q).writes_overrides:
                print(f"{k}: {len(v)} entries (bits per layer chosen by {q.get('method')})")
            elif k == "size_on_disk_bytes":
                print(f"size_on_disk: {v / 2**20:.1f} MiB ({v} bytes)")
            else:
                print(f"{k}: {v}")
    return 0


def _read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"hfquant: {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"hfquant: {path} does not hold a JSON object")
    return config


def _unexcluded_float(headers: dict, q: dict) -> list[str]:
    """The float matrices (2-D or 3-D, over 1M elements) of a checkpoint that are not quantized
    and that modules_to_not_convert does not name: neither embeddings nor MoE routers."""
    from .experts import LEFTOVER_MIN_ELEMENTS
    from .methods import layer_tensor_keys
    from .modeling import is_listed

    skip = q.get("modules_to_not_convert") or []
    quantized = tuple(f".{k}" for k in layer_tensor_keys()) + tuple(
        f".{p}_{k}" for p in ("gate_up", "down") for k in ("qweight", "scales", "zeros"))
    out = []
    for shapes in headers.values():
        for k, shape in shapes.items():
            if len(shape) not in (2, 3) or math.prod(shape) < LEFTOVER_MIN_ELEMENTS or k.endswith(quantized):
                continue
            module = k.rpartition(".")[0]
            last = module.rpartition(".")[2]
            if is_listed(module, skip) or "embed" in last or last in ("wte", "wpe", "gate", "router"):
                continue
            out.append(k)
    return sorted(out)


def _safetensors_headers(model_dir: str) -> dict[str, dict[str, list[int]]]:
    """{file: {tensor: shape}} of the checkpoint's safetensors files; a file that safetensors cannot
    open (truncated, damaged) is an error naming it."""
    from safetensors import SafetensorError, safe_open

    out = {}
    for fname in sorted(os.listdir(model_dir)):
        if not fname.endswith(".safetensors"):
            continue
        path = os.path.join(model_dir, fname)
        try:
            with safe_open(path, "pt") as f:
                out[fname] = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"hfquant: {path} cannot be read as a safetensors file ({_one_line(exc)}); "
                             "it is truncated or damaged") from None
    return out


def _saved_method(q: dict):
    """The method class of a saved hfquant quantization_config."""
    from .methods import get_method

    return get_method(q.get("method", "rtn"))


def _cmd_eval(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfquant
    from . import data
    from .evaluate import decode_speed, model_bytes, perplexity, perplexity_with_cache, size_on_disk
    from .evaluate.compare import check_model_dir
    from .evaluate.run_one import ALL_CONFIGS, KV_CHUNK, cache_factory, kv_cache_settings, load

    if args.config and args.bits:
        raise ValueError("give either --config or --bits/--group-size, not both")
    if args.config and args.config not in ALL_CONFIGS:
        raise ValueError(f"unknown --config {args.config!r} (use one of {', '.join(ALL_CONFIGS)})")
    check_model_dir(args.model_dir)
    saved = _saved_quantization(args.model_dir)
    if saved is not None and (args.config or args.bits):
        raise ValueError(f"hfquant: {args.model_dir} holds {saved}: hfquant eval measures it as saved; "
                         "drop --config / --bits")
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    text = open(args.text, encoding="utf-8").read() if args.text else data.wikitext_test()
    n_tokens = min(args.max_tokens, len(tok(text).input_ids))
    if n_tokens < args.window:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than one window of {args.window} "
                         "(give a longer --text or a smaller --window)")
    if args.config:
        model = load(args.model_dir, args.config)
        described = {"config": args.config, "settings": ALL_CONFIGS[args.config][1]}
    elif args.bits:
        group_size = args.group_size if args.group_size is not None else default_group_size("rtn", args.bits)
        cfg = hfquant.HfQuantConfig(bits=args.bits, group_size=group_size)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=cfg, dtype=torch.float32)
        described = {"config": cfg.to_dict()}
    else:
        # loaded as saved: no quantization_config argument (transformers reads quantization_config=None
        # as "replace the checkpoint's with none" and would load the packed tensors into a float model)
        if saved is not None:
            print(f"hfquant eval: {args.model_dir} holds {saved}; evaluating it as saved", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        described = {"config": "as saved", "checkpoint": saved} if saved else {"config": "float32"}
    stride = args.stride or args.window
    kv = kv_cache_settings(model, args.config)
    if kv is None:
        ppl = perplexity(model, tok, text, max_length=args.window, stride=stride, max_tokens=args.max_tokens,
                         progress=True)
    else:
        ppl = perplexity_with_cache(model, tok, text, cache_factory(model, kv),
                                    max_length=args.window, stride=stride, chunk=KV_CHUNK,
                                    max_tokens=args.max_tokens, progress=True)
    res = {
        "model": args.model_dir, **described,
        "perplexity": ppl, "perplexity_tokens": n_tokens, "window": args.window, "stride": stride,
        "size_on_disk_bytes": size_on_disk(args.model_dir) if not args.config and not args.bits else None,
        "memory_bytes": model_bytes(model),
        "decode_tokens_per_s": decode_speed(model, tok, cache=cache_factory(model, kv)),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0


def _saved_quantization(model_dir: str) -> str | None:
    """What the checkpoint's config.json says it holds ("an hfquant checkpoint (w4g128, method rtn)"),
    or None for a float checkpoint."""
    q = _read_config(model_dir).get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "hfquant":
        return f"a {q.get('quant_method')} checkpoint"
    from .config import HfQuantConfig

    cfg = HfQuantConfig.from_dict(q)
    return f"an hfquant checkpoint ({cfg.short_name}, method {cfg.method})"


def _cmd_compare(args) -> int:
    from .evaluate.compare import compare

    command = "hfquant " + " ".join(args.argv)
    doc = compare(args.model_dir, configs=args.configs, peers=args.peers, text=args.text,
                  max_tokens=args.max_tokens, out=args.out, threads=args.threads, new_tokens=args.new_tokens,
                  prompt_tokens=args.prompt_tokens, repeats=args.repeats, watts_per_core=args.watts_per_core,
                  window=args.window, stride=args.stride, command=command, timeout=args.timeout)
    failed = [r["config"] for r in doc["results"] if not r.get("ok")]
    print(f"wrote {os.path.join(args.out, 'report.md')}, results.json and {len(doc['plots'])} plot(s)"
          + (f"; n/a: {', '.join(failed)}" if failed else ""))
    return 0


def _cmd_export(args) -> int:
    from transformers import AutoModelForCausalLM

    import hfquant  # noqa: F401  (registers the quant method)
    from .interop import export_model

    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise FileNotFoundError(f"{args.model_dir} has no config.json")
    cfg = json.load(open(os.path.join(args.model_dir, "config.json"))).get("quantization_config") or {}
    if cfg.get("quant_method") != "hfquant":
        raise ValueError(f"{args.model_dir} is not an hfquant checkpoint (quantize it with `hfquant quantize` first)")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    qcfg = export_model(model, args.out_dir, args.format, source_dir=args.model_dir)
    print(f"wrote {args.out_dir} ({args.format}: {json.dumps(qcfg.get('config_groups', qcfg))[:200]})")
    return 0


def _cmd_convert(args) -> int:
    from .interop import convert_checkpoint

    hq = convert_checkpoint(args.in_dir, args.out_dir, dtype=args.dtype)
    print(f"wrote {args.out_dir} (hfquant format v1, {hq.short_name}); load it with from_pretrained")
    return 0


THREADS_HELP = ("CPU threads (torch.set_num_threads; default: torch's, one per core). On a machine whose cores "
                "are busy, more threads than free cores can be many times slower than one: use --threads 1")


def default_group_size(method: str, bits: int | None) -> int | None:
    """The --group-size a command line without one gets: the method's choice for 8-bit weights
    (-1, per channel, what the README calls W8, for the weight-only methods), else the config's
    default (None)."""
    from .methods import get_method

    return get_method(method).w8_group_size if bits == 8 else None


# the options that set a method's settings (HfQuantConfig arguments); --setting KEY=VALUE sets any
_SETTING_OPTIONS = {"llm_int8_threshold": "--threshold", "smoothquant_alpha": "--smoothquant-alpha",
                    "fold_norms": "--fold-norms", "act_order": "--act-order", "damp": "--damp",
                    "clip_search": "--clip-search", "target_bits": "--target-bits", "mixed_bits": "--mixed-bits",
                    "sensitivity": "--sensitivity", "mixed_base": "--mixed-base", "grid": "--grid",
                    "zero_point": "--zero-point",
                    "calibration": "--calib-text, --calib-samples, --calib-seq-len"}


def _method_settings(args) -> dict:
    """The method settings a quantize command line gives, checked against --method: an option of
    another method fails naming the methods it applies to."""
    from .methods import get_method, methods_taking

    given = {k: getattr(args, k) for k in _SETTING_OPTIONS if k != "calibration" and getattr(args, k) is not None}
    calibration = {k: v for k, v in (("text", args.calib_text), ("n_samples", args.calib_samples),
                                     ("seq_len", args.calib_seq_len)) if v is not None}
    if calibration:
        given["calibration"] = calibration
    own = get_method(args.method).setting_names()
    for key in given:
        if key in own:
            continue
        takers = methods_taking(key)
        group = [_SETTING_OPTIONS[k] for k in _SETTING_OPTIONS if methods_taking(k) == takers]
        opts = group[0] if len(group) == 1 else ", ".join(group[:-1]) + " and " + group[-1]
        verb = "applies" if len(group) == 1 and "," not in opts else "apply"
        raise ValueError(f"{opts} {verb} to --method {' or '.join(takers)}")
    for item in args.setting or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--setting {item!r}: expected KEY=VALUE (a setting of HfQuantConfig)")
        try:
            given[key] = json.loads(value)
        except ValueError:
            given[key] = value
    return given


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="hfquant", description="INT8/INT4 quantization for transformers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize", help="quantize a model directory and save it")
    q.add_argument("model_dir")
    q.add_argument("out_dir")
    q.add_argument("--method", default="rtn",
                   help="a registered method (hfquant/methods/): rtn (default): weight-only; gptq / awq: "
                        "weight-only, calibrated; llm_int8 / w8a8: int8 activations too; kmeans: weight clustering "
                        "(2^bits centroids per row or group); mixed: bits per layer from sensitivity under "
                        "--target-bits")
    q.add_argument("--setting", action="append", metavar="KEY=VALUE",
                   help="any setting of the method (an HfQuantConfig argument; VALUE read as JSON, else as a "
                        "string), e.g. --setting kmeans_init=quantile; repeatable")
    q.add_argument("--bits", type=int, default=None, choices=[2, 3, 4, 8],
                   help="default 4 (rtn, gptq, awq, kmeans), 8 (llm_int8, w8a8); 2 and 3 for rtn, gptq, awq, kmeans")
    q.add_argument("--quantize-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the token embedding too (a tied lm_head shares it); default on for mixed, and "
                        "at 8 bits for rtn, gptq and awq with fewer than 8 bits")
    q.add_argument("--target-bits", type=float, default=None,
                   help="mixed: stored bits per weight, scales and embeddings included (default 4.5)")
    q.add_argument("--mixed-bits", type=int, nargs="+", default=None, help="mixed: bit widths to choose from "
                   "(default 2 3 4 8)")
    q.add_argument("--sensitivity", choices=["fisher", "variance"], default=None,
                   help="mixed: fisher (calibrated, default) or variance (data free)")
    q.add_argument("--mixed-base", choices=["rtn", "gptq"], default=None, help="mixed: quantizer per layer (rtn)")
    q.add_argument("--plot-bits", default=None, metavar="PNG", help="write the bits-per-layer plot here")
    q.add_argument("--group-size", type=int, default=None,
                   help="default -1 (one scale per output channel) for --bits 8 and for llm_int8, w8a8, kmeans; "
                        "128 otherwise")
    q.add_argument("--asymmetric", action="store_true", help="per-group zero points")
    q.add_argument("--grid", choices=["range", "extreme", "best"], default=None,
                   help="rtn, symmetric: how each group's scale is placed (default best; extreme = GGUF Q4_0's)")
    q.add_argument("--rotation", choices=["hadamard"], default=None,
                   help="rotate the residual stream and v/o by seeded randomized Hadamard matrices before "
                        "quantizing (exact in float; docs/accuracy.md measures it)")
    q.add_argument("--rotation-seed", type=int, default=0, help="seed of --rotation's random signs (default 0)")
    q.add_argument("--rotation-online", choices=["down_proj", "none"], default="down_proj",
                   help="with --rotation: also rotate each MLP's down_proj input online (default), or none")
    q.add_argument("--zero-point", choices=["integer", "float"], default=None,
                   help="rtn with --asymmetric: integer zero points (default) or float offsets (GGUF Q4_1's grid)")
    q.add_argument("--threshold", dest="llm_int8_threshold", type=float, default=None,
                   help="LLM.int8 outlier threshold (default 6; 0: off)")
    q.add_argument("--smoothquant-alpha", type=float, default=None,
                   help="calibrate SmoothQuant with this migration strength (0..1) while quantizing")
    q.add_argument("--fold-norms", action=argparse.BooleanOptionalAction, default=None,
                   help="move pre-norm scales into the next layers first (default on)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: columns by decreasing Hessian diagonal, permutation stored (default on)")
    q.add_argument("--damp", type=float, default=None, help="gptq: Hessian dampening relative to its mean diagonal "
                   "(default 0.01)")
    q.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq/awq: search a clipped range per group (default on)")
    q.add_argument("--calib-text", default=None, help="calibration text file (default: WikiText-2 validation)")
    q.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 32; 128 for gptq/awq)")
    q.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration window (default 512)")
    q.add_argument("--skip", nargs="*", default=None,
                   help="modules kept in full precision: names, name ends or re: patterns (default: lm_head, "
                        "vision/audio encoders and heads tied to an embedding)")
    q.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)
    q.set_defaults(fn=_cmd_quantize)
    x = sub.add_parser("export", help="write an hfquant checkpoint in another format (gptq, compressed-tensors)")
    x.add_argument("model_dir", help="an hfquant checkpoint (weight-only: rtn, gptq, awq)")
    x.add_argument("out_dir")
    x.add_argument("--format", required=True, choices=["gptq", "compressed-tensors"])
    x.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)
    x.set_defaults(fn=_cmd_export)
    v = sub.add_parser("convert", help="convert a GPTQ, AWQ (GEMM) or compressed-tensors checkpoint to hfquant")
    v.add_argument("in_dir")
    v.add_argument("out_dir")
    v.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the scales and float tensors (auto: the checkpoint's)")
    v.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)
    v.set_defaults(fn=_cmd_convert)
    y = sub.add_parser("verify", help="check every tensor of a checkpoint against the checksum save wrote")
    y.add_argument("model_dir", help="a checkpoint folder saved by hfquant, or one .safetensors file")
    y.set_defaults(fn=_cmd_verify)
    i = sub.add_parser("info", help="describe a (quantized) checkpoint directory")
    i.add_argument("model_dir")
    i.add_argument("--json", action="store_true")
    i.add_argument("--plot-bits", default=None, metavar="PNG", help="write a plot of the bits per layer")
    i.set_defaults(fn=_cmd_info)
    e = sub.add_parser("eval", help="perplexity, memory and decode speed of a model")
    e.add_argument("model_dir")
    e.add_argument("--config", default=None,
                   help="a named config of compare (w4g128, w8a8, llm_int8, bf16, kv4, a peer's, ...)")
    e.add_argument("--bits", type=int, choices=[4, 8], default=None, help="quantize a float model on load first")
    e.add_argument("--group-size", type=int, default=None, help="with --bits: default -1 (per channel) for 8, 128 for 4")
    e.add_argument("--text", default=None, help="text file (default: WikiText-2 test)")
    e.add_argument("--max-tokens", type=int, default=16384)
    e.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --window)")
    e.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)
    e.add_argument("--json", default=None)
    e.set_defaults(fn=_cmd_eval)
    from .evaluate.run_one import CONFIGS, PEERS

    c = sub.add_parser("compare", help="measure several configs (each in a fresh process) and write a report")
    c.add_argument("model_dir")
    c.add_argument("--configs", default="fp32,bf16,w8,w4g128,w4g64a", help=f"comma list of {', '.join(CONFIGS)}")
    c.add_argument("--peers", default=None, help=f"comma list of peer libraries, if installed: {', '.join(PEERS)}")
    c.add_argument("--text", default=None, help="text file (default: WikiText-2 test)")
    c.add_argument("--max-tokens", type=int, default=16384, help="perplexity on the first N tokens")
    c.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    c.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: --window, disjoint windows)")
    c.add_argument("--out", default="report", help="output folder (report.md, results.json, *.png)")
    c.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP + " (each config's process)")
    c.add_argument("--new-tokens", type=int, default=64, help="decode tokens per measurement")
    c.add_argument("--prompt-tokens", type=int, default=512, help="prefill prompt length")
    c.add_argument("--repeats", type=int, default=3, help="speed measurements per config (median)")
    c.add_argument("--timeout", type=float, default=None,
                   help="seconds one config may take; a config over it is reported as n/a (timed out)")
    c.add_argument("--watts-per-core", type=float, default=10.0,
                   help="assumed power of a busy core for the energy estimate when RAPL is not readable")
    c.set_defaults(fn=_cmd_compare)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_paths(args)
        import hfquant

        hfquant._load()  # torch, the native ops, transformers and the registration, now that the paths hold
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return args.fn(args)
    except (ValueError, OSError) as exc:  # FileNotFoundError and PermissionError are OSErrors
        print(f"hfquant {args.cmd}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
