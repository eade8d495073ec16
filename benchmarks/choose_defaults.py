"""Defaults chosen on validation text, reported on test text (docs/accuracy.md, section
defaults-validation).

Every setting whose default was picked by measuring is measured here again, each candidate
on the default model: perplexity on WikiText-2 *validation* windows picks the candidate, and
the *test* windows report it. Calibrated candidates (SmoothQuant) calibrate on the first part
of the validation split and are scored on windows taken from its last part, so no window is
both calibrated and scored.

    python benchmarks/choose_defaults.py                  # prints the table
    python benchmarks/choose_defaults.py --write-docs     # and writes it into docs/accuracy.md

A default that validation does not pick is listed as such (the script exits 1), so that it is
either changed or its reason written down.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

import hfquant  # noqa: E402
from hfquant import data, formats  # noqa: E402
from hfquant.evaluate import perplexity  # noqa: E402

# share of the validation split (from its start) that calibration may read; the scored
# validation windows come after it
CALIB_SHARE = 0.8


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K] as [N, G, group_size], the last group padded with zeros."""
    N, K = w.shape
    pad = -K % group_size
    return torch.nn.functional.pad(w.float(), (0, pad)).reshape(N, -1, group_size)


def _grid_maxabs(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """The earlier symmetric 4-bit grid: s = max|w| / 7, codes -7..7 (the lowest code unused)."""
    g = _groups(w, group_size)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7
    return (torch.clamp(torch.round(g / s), -7, 7) * s).reshape(w.shape[0], -1)[:, :w.shape[1]]


def _grid_mse(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """The range grid with each group's range shrunk by the factor of least squared weight error,
    up to half of it (method rtn_mse with max_shrink 0.5; its own sweep is a question below)."""
    from hfquant.algorithms.gptq import search_clip
    from hfquant.formats.v1 import grouped

    clip = search_clip(grouped(w.float(), group_size), None, 4, True, w.dtype, steps=20, max_shrink=0.5)
    return formats.fake_quantize(w, 4, -1 if group_size == w.shape[1] else group_size, True, clip=clip)


def _gguf(kind: str):
    """GGUF's own rounding (the gguf package's reference quantizer, which follows llama.cpp's),
    blocks of 32: Q4_0 (scale = the largest-magnitude weight / -8, fp16) or Q4_1 (scale and
    minimum, fp16)."""
    def grid(w: torch.Tensor, group_size: int) -> torch.Tensor:
        from gguf import GGMLQuantizationType, quants

        t = getattr(GGMLQuantizationType, kind)
        a = w.detach().float().numpy()
        return torch.from_numpy(quants.dequantize(quants.quantize(a, t), t).reshape(a.shape).copy())
    return grid


# defaults kept although validation picks another candidate, and why (written under the table)
KEPT = {"W4 g32 asymmetric zero point (RTN)":
        "the float offset wins at g32 only because this model's weights come from a Q4_1 GGUF (blocks of 32, "
        "a float minimum each), so that grid reproduces them; at g128 and per channel it loses by far (the "
        "near-zero weights of a group share one rounding offset), and one default serves every group size"}

# fake-quantized candidates that are not method rtn's stored grids, and why
NOT_IN_FORMAT = {"max abs / 7": "an earlier grid, for comparison",
                 "MSE clip search": "method rtn_mse (max_shrink 0.5), not a grid of rtn",
                 "GGUF Q4_0 (llama.cpp's rounding)": "GGUF's format, for comparison",
                 "GGUF Q4_1 (llama.cpp's rounding)": "GGUF's format, for comparison"}


def grid_questions() -> list:
    """The W4 grids at g128, per channel and g32: symmetric (grid), asymmetric (zero_point); GGUF's
    Q4_0 / Q4_1 beside the g32 ones (their blocks are 32)."""
    out = []
    for g in (128, -1, 32):
        where = "per channel" if g == -1 else f"g{g}"
        default_grid = hfquant.HfQuantConfig(bits=4, group_size=g).grid
        sym = [(f"{grid}{' (default)' if grid == default_grid else ''}", dict(bits=4, group_size=g, grid=grid),
                grid == default_grid) for grid in formats.GRIDS]
        sym += [("max abs / 7", (_grid_maxabs, g), False), ("MSE clip search", (_grid_mse, g), False)]
        if g == 32:
            sym.append(("GGUF Q4_0 (llama.cpp's rounding)", (_gguf("Q4_0"), g), False))
        out.append((f"W4 {where} symmetric grid (RTN)", sym))
        default_zp = hfquant.HfQuantConfig(bits=4, group_size=g, symmetric=False).zero_point
        asym = [(f"{zp}{' (default)' if zp == default_zp else ''}",
                 dict(bits=4, group_size=g, symmetric=False, zero_point=zp), zp == default_zp)
                for zp in formats.ZERO_POINTS]
        if g == 32:
            asym.append(("GGUF Q4_1 (llama.cpp's rounding)", (_gguf("Q4_1"), g), False))
        out.append((f"W4 {where} asymmetric zero point (RTN)", asym))
    return out


# (question, [(candidate label, HfQuantConfig settings, is the default)])
CHOICES = [
    ("LLM.int8 fold_norms", [("on (default)", dict(method="llm_int8"), True),
                             ("off", dict(method="llm_int8", fold_norms=False), False)]),
    ("W8A8 fold_norms", [("on (default)", dict(method="w8a8"), True),
                         ("off", dict(method="w8a8", fold_norms=False), False)]),
    ("LLM.int8 threshold (norm scales folded)", [("4", dict(method="llm_int8", llm_int8_threshold=4.0), False),
                                                 ("6 (default)", dict(method="llm_int8"), True),
                                                 ("8", dict(method="llm_int8", llm_int8_threshold=8.0), False)]),
    ("W8A8 SmoothQuant alpha (README's and compare's w8a8sq)",
     [("0.5", dict(method="w8a8", smoothquant_alpha=0.5), False),
      ("0.6 (used)", dict(method="w8a8", smoothquant_alpha=0.6), True),
      ("0.7", dict(method="w8a8", smoothquant_alpha=0.7), False)]),
    ("rtn_mse max_shrink (W4 g128)", [("0.5", dict(method="rtn_mse", max_shrink=0.5), False),
                                      ("0.2", dict(method="rtn_mse", max_shrink=0.2), False),
                                      ("0.1 (default)", dict(method="rtn_mse", max_shrink=0.1), True)]),
]


def _fake_quantized(model_dir: str, grid, group_size: int) -> torch.nn.Module:
    """The float model with every Linear weight but lm_head replaced by ``grid``'s W4 values
    (group_size -1: one group per row)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                gs = mod.weight.shape[1] if group_size == -1 else group_size
                mod.weight.copy_(grid(mod.weight, gs))
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=8, help="512-token windows scored in each split (default 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="comma-separated question numbers (0-5: the W4 grids)")
    p.add_argument("--json", type=Path, default=None, help="also keep the measurements in this file")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="render kept runs instead of measuring; a later file's questions replace an earlier's")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "accuracy.md")
    args = p.parse_args(argv)
    command = common.command_line(__file__, argv)
    if args.from_json:
        merged = list(merge_runs([json.loads(f.read_text()) for f in args.from_json]))
        merged[2] = merged[2] + [command]  # and the command that rendered them
        return render(*merged, args.docs if args.write_docs else None)
    torch.set_num_threads(args.threads)
    model_dir = str(data.default_model_dir("float32"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    valid = data.wikitext_valid()
    cut = int(len(valid) * CALIB_SHARE)
    cut = valid.index("\n", cut) + 1
    calib_text, valid_scored = valid[:cut], valid[cut:]
    test = data.wikitext_test()
    only = None if args.only is None else {int(x) for x in args.only.split(",")}
    t0 = time.perf_counter()

    def score(model) -> tuple[float, float]:
        with common.float_activations():
            return (perplexity(model, tok, valid_scored, max_length=512, stride=512, max_windows=args.windows),
                    perplexity(model, tok, test, max_length=512, stride=512, max_windows=args.windows))

    base = score(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    questions = all_questions()
    results = []
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as calib:
        calib.write(calib_text)
        calib.flush()
        for qi, (question, candidates) in enumerate(questions):
            if only is not None and qi not in only:
                continue
            measured = []
            for label, how, is_default in candidates:
                if isinstance(how, tuple):
                    model = _fake_quantized(model_dir, *how)
                else:
                    settings = dict(how)
                    if settings.get("smoothquant_alpha") is not None:
                        settings["calibration"] = {"text": calib.name}
                    model = AutoModelForCausalLM.from_pretrained(
                        model_dir, quantization_config=hfquant.HfQuantConfig(**common.weights_alone(settings)))
                v, t = score(model)
                del model
                measured.append((label, v, t, is_default))
                print(f"{question} | {label} | valid {v:.3f} | test {t:.3f}", file=sys.stderr, flush=True)
            results.append({"question": question, "candidates": [
                {"label": m[0], "valid": m[1], "test": m[2], "default": m[3]} for m in measured]})
    if args.json:
        args.json.write_text(json.dumps({"command": command, "base": base, "results": results,
                                         "date": time.strftime('%Y-%m-%d', time.gmtime()),
                                         "seconds": time.perf_counter() - t0, "threads": args.threads,
                                         "cpu": common.cpu_model(), "windows": args.windows,
                                         "model_dir": Path(model_dir).name}, indent=1))
    return render(results, base, command, args.windows, args.threads, common.cpu_model(),
                  time.strftime('%Y-%m-%d', time.gmtime()), time.perf_counter() - t0, model_dir,
                  args.docs if args.write_docs else None)


def all_questions() -> list:
    """(question, [(candidate label, how, is the default)]): the W4 grids (grid_questions), then
    CHOICES."""
    return grid_questions() + CHOICES


def merge_runs(runs: list[dict]) -> tuple:
    """One table from kept runs on the same model and windows: a later run's questions replace
    an earlier's (a default changed, its question measured again); every command is listed."""
    first = runs[0]
    for r in runs[1:]:
        if (r["base"], r["windows"], r.get("model_dir")) != (first["base"], first["windows"], first.get("model_dir")):
            raise SystemExit("choose_defaults: the runs to merge differ in model, windows or baseline")
    results: dict[str, dict] = {}
    for r in runs:
        results.update({q["question"]: q for q in r["results"]})
    # the questions the script asks now, in its order (a question reworded since is dropped)
    results = {q: results[q] for q, _ in all_questions() if q in results}
    threads = sorted({r["threads"] for r in runs})
    return (list(results.values()), first["base"], [r["command"] for r in runs], first["windows"],
            "/".join(map(str, threads)), first["cpu"], max(r["date"] for r in runs), sum(r["seconds"] for r in runs),
            first.get("model_dir", "smollm2-135m-float32"))


def render(results, base, command, windows, threads, cpu, date, seconds, model_dir, docs) -> int:
    """Prints (and with ``docs`` writes) the section; returns 1 where a default is not the
    candidate validation picks among those format v1 can store."""
    rows, disagree, kept = [], [], []
    for r in results:
        question, measured = r["question"], r["candidates"]
        storable = [m for m in measured if m["label"] not in NOT_IN_FORMAT]
        best = min(storable, key=lambda m: m["valid"])
        overall = min(measured, key=lambda m: m["valid"])
        for m in measured:
            note = "**chosen**" if m is best else NOT_IN_FORMAT.get(m["label"], "")
            if m is overall and m is not best:
                note += " (lowest; not a candidate for the default)"
            rows.append([question, m["label"], f"{m['valid']:.3f} ({100 * (m['valid'] / base[0] - 1):+.2f}%)",
                         f"{m['test']:.3f} ({100 * (m['test'] / base[1] - 1):+.2f}%)", note])
        if not best["default"]:
            if question in KEPT:
                kept.append(f"{question}: validation picks {best['label']!r}; the default is kept: {KEPT[question]}")
            else:
                disagree.append(f"{question}: validation picks {best['label']!r}")
    table = common.md_table(["setting", "candidate", "validation perplexity", "test perplexity",
                             "on validation"], rows)
    body = "\n".join([
        "### Defaults chosen on validation text", "",
        ("Command: " if isinstance(command, str) else "Commands (the runs, a later one's questions replacing "
         "the earlier's, each keeping its measurements with --json; then the one that merged them): ")
        + "; ".join(f"`{c}`" for c in ([command] if isinstance(command, str) else command)), "",
        f"Model {Path(model_dir).name} (fp32: validation {base[0]:.3f}, test {base[1]:.3f}); validation: "
        f"{windows} windows of 512 tokens from the last {100 - 100 * CALIB_SHARE:.0f}% of WikiText-2 "
        f"validation (calibration reads only the first {100 * CALIB_SHARE:.0f}%); test: the first {windows} "
        f"windows of WikiText-2 raw test. Among the candidates the checkpoint format can store, the one with the "
        f"lowest validation perplexity is chosen; the test column reports it. {threads} threads, {cpu}; run "
        f"{date}, {seconds:.0f} s.", "", table, "",
        "Rows named by a grid or zero point are models quantized by method rtn (what it stores). The rows marked "
        "for comparison are fake-quantized: the float model with each Linear weight but lm_head (tied, kept) "
        "replaced by its W4 values on that grid; GGUF's rows round with the gguf package's reference quantizer, "
        "blocks of 32. The default model's weights come from a Q4_1 GGUF, so they lie on a Q4_1 grid: the float "
        "offset at g32 reproduces them.",
        "" if not kept else "\nKept against validation: " + "; ".join(kept) + ".",
        "" if not disagree else "\nNot picked by validation: " + "; ".join(disagree) + "."])
    print(body)
    if docs is not None:
        common.write_doc_section(docs, "defaults-validation", body, "# Accuracy\n")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
