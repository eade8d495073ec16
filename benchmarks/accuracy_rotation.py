"""Perplexity of RTN W4 and W8A8 with and without the Hadamard rotation (rotation="hadamard"),
offline only (rotation_online=[]) and with the online rotation of down_proj's input (the
default), on the default model (or any model dir), WikiText-2 validation and test windows.

In one process: the float model, the rotated float model (offline, and with the online
rotation: same function, a check), and RTN W4 g128 symmetric with the default grid ("best") and
grid="range", and W8A8 (int8 activations per token, where rotations are meant to help), each
without rotation and with it, offline only and with the online rotation (one row per seed). Validation windows are taken from the start of the
validation split, test windows from the start of the test split.

    python benchmarks/accuracy_rotation.py                  # 8 windows of 512 tokens per split
    python benchmarks/accuracy_rotation.py --seeds 0,1 --write-docs
    python benchmarks/accuracy_rotation.py --gptq --threads 2 --write-docs   # section accuracy-rotation-gptq

--gptq runs GPTQ W4 g128 (default calibration) without rotation, with the offline rotation, with
the online down_proj rotation, and with it plus the embedding and the (untied) lm_head at W8
g128, and gives each checkpoint's size (safetensors files of save_pretrained).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

import hfquant  # noqa: E402
from hfquant import data  # noqa: E402
from hfquant.algorithms.rotation import rotate_model  # noqa: E402
from hfquant.evaluate import perplexity  # noqa: E402

DOC_INTRO = "# Accuracy\n"

SCHEMES = [
    ("RTN W4 g128, grid best (default)", dict(bits=4, group_size=128)),
    ("RTN W4 g128, grid range", dict(bits=4, group_size=128, grid="range")),
    ("W8A8 (norm scales folded, the default)", dict(method="w8a8")),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2-135M, fp32)")
    p.add_argument("--windows", type=int, default=8, help="512-token windows scored in each split (default 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", default="0", help="comma list of rotation seeds (default 0)")
    p.add_argument("--gptq", action="store_true", help="GPTQ W4 g128 rows instead (section accuracy-rotation-gptq)")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "accuracy.md")
    args = p.parse_args(argv)
    command = common.command_line(__file__, argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    model_dir = args.model or str(data.default_model_dir("float32"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    valid, test = data.wikitext_valid(), data.wikitext_test()

    def score(model) -> tuple[float, float]:
        with common.float_activations():
            return tuple(perplexity(model, tok, text, max_length=512, stride=512, max_windows=args.windows)
                         for text in (valid, test))

    if args.gptq:
        return _gptq(args, command, model_dir, score)
    # (label, scheme, seed, online rotations)
    runs: list[tuple[str, dict | None, int | None, list]] = [("fp32", None, None, [])]
    runs += [(f"fp32, rotated offline (seed {s})", None, s, []) for s in seeds[:1]]
    runs += [(f"fp32, rotated + online down_proj (seed {s})", None, s, ["down_proj"]) for s in seeds[:1]]
    for label, cfg in SCHEMES:
        runs.append((label, cfg, None, []))
        runs += [(f"{label} + rotation offline (seed {s})", cfg, s, []) for s in seeds]
        runs += [(f"{label} + rotation + online down_proj (seed {s})", cfg, s, ["down_proj"]) for s in seeds]
    rows, base = [], None
    t0 = time.perf_counter()
    for label, cfg, seed, online in runs:
        if cfg is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            if seed is not None:
                rotate_model(model, seed, online)
        else:
            rot = {} if seed is None else {"rotation": "hadamard", "rotation_seed": seed, "rotation_online": online}
            model = AutoModelForCausalLM.from_pretrained(model_dir,
                                                         quantization_config=hfquant.HfQuantConfig(
                                                             **common.weights_alone(cfg), **rot))
        v, t = score(model)
        base = base or (v, t)
        rows.append([label, f"{v:.3f} ({100 * (v / base[0] - 1):+.2f}%)", f"{t:.3f} ({100 * (t / base[1] - 1):+.2f}%)"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        del model
    table = common.md_table(["config", "valid perplexity (vs fp32)", "test perplexity (vs fp32)"], rows)
    body = "\n".join([
        "### Hadamard rotation (rotation=\"hadamard\"), offline and online: RTN W4 and W8A8", "",
        f"Command: `{command}`", "",
        f"Model {Path(model_dir).name}; WikiText-2 raw validation and test, first {args.windows} windows of 512 "
        f"tokens of each (stride 512); {args.threads} thread(s), {common.cpu_model()}; run "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, {time.perf_counter() - t0:.0f} s.", "",
        table, "",
        "The rotation folds the norm scales into the following layers, rotates the residual stream "
        "(576 = 36 x 16: a Paley order-36 Hadamard matrix times Sylvester's order 16) and v/o per head (64), "
        "with random signs from the seed; lm_head and the embedding stay float32 as by default (lm_head is "
        "untied from the embedding because the final norm folds into it). Online down_proj (the default "
        "with a rotation): each down_proj's input is also rotated as the model runs (1536 = 12 x 128: "
        "Paley order 12 times Sylvester's 128, hfquant::hadamard_transform) and its weight holds the inverse. "
        "For weight-only RTN the rotation mixes the output rows of o_proj / down_proj (and v_proj per head), "
        "so a row's scale no longer matches its own range, and folding the norm scales (which range "
        "from -0.3 to 1.4 on this model) into q/k/v and gate/up changes their column ranges; the table "
        "shows what that costs here. QuaRot pairs the rotation with GPTQ and with activation quantization."])
    print(body)
    if args.write_docs:
        common.write_doc_section(args.docs, "accuracy-rotation", body, DOC_INTRO)
    return 0


def _gptq(args, command, model_dir, score) -> int:
    import tempfile

    base = dict(method="gptq", bits=4, group_size=128)
    w8_ends = dict(quantize_embeddings=True, modules_to_not_convert=[],
                   modules_override={"embed_tokens": {"bits": 8}, "lm_head": {"bits": 8}})
    runs = [("GPTQ W4 g128", dict(base)),
            ("GPTQ W4 g128 + rotation offline (seed 0)", dict(base, rotation="hadamard", rotation_online=[])),
            ("GPTQ W4 g128 + rotation + online down_proj (seed 0)", dict(base, rotation="hadamard")),
            ("GPTQ W4 g128 + rotation + online down_proj, embedding and lm_head W8 g128 (seed 0)",
             dict(base, rotation="hadamard", **w8_ends))]
    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = score(fp)
    del fp
    rows = [["fp32", f"{ref[0]:.3f}", f"{ref[1]:.3f}", ""]]
    t0 = time.perf_counter()
    for label, cfg in runs:
        qcfg = hfquant.HfQuantConfig(**common.weights_alone(cfg))
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qcfg)
        v, t = score(model)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            size = sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))
        rows.append([label, f"{v:.3f} ({100 * (v / ref[0] - 1):+.2f}%)", f"{t:.3f} ({100 * (t / ref[1] - 1):+.2f}%)",
                     f"{size / 1e6:.0f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        del model
    body = "\n".join([
        "### Hadamard rotation with GPTQ W4 g128", "",
        f"Command: `{command}`", "",
        f"Model {Path(model_dir).name}; WikiText-2 raw validation and test, first {args.windows} windows of 512 "
        f"tokens of each (stride 512); GPTQ with its default calibration; {args.threads} thread(s), "
        f"{common.cpu_model()}; run {time.strftime('%Y-%m-%d', time.gmtime())}, {time.perf_counter() - t0:.0f} s.",
        "", common.md_table(["config", "valid perplexity (vs fp32)", "test perplexity (vs fp32)", "checkpoint MB"],
                            rows), "",
        "The rotation unties lm_head from the embedding (the final norm folds into it), so a rotated checkpoint "
        "holds both; by default lm_head stays float32 (113 MB here)."])
    print(body)
    if args.write_docs:
        common.write_doc_section(args.docs, "accuracy-rotation-gptq", body, DOC_INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
