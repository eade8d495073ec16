"""CUDA linear-layer benchmark: hfquant's kernels beside torch's own GPU paths.

    python benchmarks/bench_cuda.py [--quick] [--sweep] [--json out.json] [--write-docs]
    python benchmarks/bench_cuda.py --from-json out.json --write-docs   # the tables of a saved run

--write-docs replaces section `cuda` of docs/benchmarks.md (common.write_doc_section) with
this run's tables, its date, card, torch and CUDA versions and command; --from-json writes
them from a run saved with --json (a GPU session that brings back only its files), no GPU needed.

Shapes N x K (out_features x in_features, y = x @ W^T) of Llama-2-7B: 4096x4096,
4096x11008 (down_proj), 11008x4096 (gate/up_proj). Per (shape, M) every method runs in
the same process, interleaved round by round; each round times `inner` calls with CUDA
events, each call on a different copy of the weights (more bytes of copies than the
50 MB L2 holds, so the weights come from HBM as in a real decode step); the figure is the
median over rounds. Achieved bandwidth counts the bytes a call must read (weights,
scales, x) and write (y); it is compared with the card's nominal HBM figure and with a
measured device-to-device copy.

Timing: CUDA graphs of the calls (GPU time; a Python loop of small calls measures the
host instead), except for the ops that synchronize with the host (LLM.int8's outlier
count, int8_gemm's input check), which run eagerly, as does any method whose capture fails
(said on stderr).

Methods: bf16 F.linear (cuBLAS); bitsandbytes NF4 (block 64, bnb.matmul_4bit, in graphs) and
LLM.int8() (Linear8bitLt, threshold 6, fp16 x; eager: it synchronizes) where bitsandbytes imports; hfquant qlinear W4 g128 (bf16 x) with the mma kernel and with
the skinny split-K kernel (M <= 64; --sweep adds each forced segments-per-block); torch._weight_int4pack_mm
(tinygemm, W4 g128) where this torch runs it; hfquant int8_gemm (pre-quantized int8 x) and
torch._int_mm (int32 out, no scaling); hfquant int8_linear W8A8 (its GEMM on cuBLASLt with the
heuristic algorithm and a workspace, and on at::_int_mm) and LLM.int8() (threshold 6, the
activation quantization, outlier split and scaling included).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

import hfquant.ops  # noqa: E402, F401
from hfquant._ext import _C  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
DOCS = HERE.parent / "docs" / "benchmarks.md"
DOC_INTRO = "# Benchmarks\n"
NOT_CAPTURED: set[str] = set()  # methods timed eagerly because a CUDA graph could not capture them
L2_BYTES = 50 << 20
NOMINAL_HBM = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, SXM parts


def nominal_hbm(name: str) -> float | None:
    if "H100" in name and "PCIe" in name:
        return 2.0e12
    for k, v in NOMINAL_HBM.items():
        if k in name:
            return v
    return None


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(3 * L2_BYTES / max(1, nbytes)))


def time_methods(methods: dict, rounds: int, inner: int, eager: tuple[str, ...] = ()) -> dict[str, float]:
    """methods: name -> list of call closures, one per weight copy. Median seconds per call.

    Each round replays a CUDA graph of `inner` calls (GPU time, as a decode loop under
    graphs sees it); methods named in `eager` (ops that synchronize with the host: the
    LLM.int8 outlier count, int8_gemm's input check) are timed as plain calls."""
    times = {k: [] for k in methods}
    graphs = {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fns in methods.values():  # warm up (cuBLAS handles, heuristics) outside capture
            for f in fns[:2]:
                f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for name, fns in methods.items():
        if name in eager:
            continue
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                for i in range(inner):
                    fns[i % len(fns)]()
        except Exception as exc:  # noqa: BLE001 - a method that cannot be captured runs eagerly
            print(f"  {name}: not capturable ({type(exc).__name__}), timed eagerly", file=sys.stderr)
            NOT_CAPTURED.add(name)
            torch.cuda.synchronize()
            continue
        graphs[name] = g
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fns in methods.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if name in graphs:
                graphs[name].replay()
            else:
                for i in range(inner):
                    fns[i % len(fns)]()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / inner)
    return {k: statistics.median(v) for k, v in times.items()}


EAGER = ("hfquant int8_gemm", "hfquant LLM.int8", "bitsandbytes LLM.int8")


def bitsandbytes():
    """The bitsandbytes module where it imports and runs on this GPU, else None (reported).
    The GPU image has none: benchmarks/cuda_session.sh installs a carried wheel from .whl/."""
    try:
        import bitsandbytes as bnb

        return bnb
    except Exception as exc:  # noqa: BLE001 - report, do not fail
        print(f"  bitsandbytes unavailable: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        return None


def bnb_nf4(bnb, wb):
    """bitsandbytes NF4 (block 64, the default of its 4-bit layers) of a bf16 weight [N, K]:
    a call x -> x @ W^T through bnb.matmul_4bit (its GEMV at M = 1), or None if it fails."""
    try:
        qw, st = bnb.functional.quantize_4bit(wb, blocksize=64, quant_type="nf4")
        x = torch.randn(1, wb.shape[1], dtype=wb.dtype, device=wb.device)
        bnb.matmul_4bit(x, qw.t(), quant_state=st)
        return lambda x: bnb.matmul_4bit(x, qw.t(), quant_state=st)
    except Exception as exc:  # noqa: BLE001
        print(f"  bitsandbytes NF4 failed: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
        return None


def bnb_int8(bnb, wb):
    """bitsandbytes LLM.int8() (Linear8bitLt, threshold 6, int8 weights) of a weight [N, K], fp16
    activations, or None if it fails."""
    try:
        N, K = wb.shape
        layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(wb.detach().cpu().to(torch.float16), requires_grad=False,
                                         has_fp16_weights=False)
        layer = layer.cuda().eval()
        with torch.no_grad():
            layer(torch.randn(2, K, dtype=torch.float16, device="cuda"))
        return layer
    except Exception as exc:  # noqa: BLE001
        print(f"  bitsandbytes LLM.int8 failed: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
        return None


def copy_bandwidth() -> float:
    a = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) / 1e3)


def w4_setup(N, K, gen):
    """W4 g128 symmetric weights: hfquant's CUDA layout, and tinygemm's where it works."""
    G = K // 128
    v = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.int32)
    qweight = (v[:, 0::2] | (v[:, 1::2] << 4)).to(torch.uint8)
    scales = (torch.rand(N, G, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    pw, ps = torch.ops.hfquant.repack(qweight.cuda(), scales.cuda(), None, 4, 128, K)
    tiny = None
    try:
        wt = torch._convert_weight_to_int4pack(qweight.cuda(), 8)
        sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).contiguous().cuda()  # [G, N, 2]
        x = torch.randn(1, K, dtype=torch.bfloat16, device="cuda")
        torch._weight_int4pack_mm(x, wt, 128, sz)
        tiny = (wt, sz)
    except Exception as exc:  # noqa: BLE001 - report, do not fail
        print(f"  torch._weight_int4pack_mm unavailable: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
    return pw, ps, tiny


def switched(fn, **settings):
    """fn with hfquant._C's CUDA kernel switches set for the call and restored after, e.g.
    switched(f, skinny_max_m=64, skinny_segs=4) or switched(f, int8_lt=True) (each name X is
    read by _C.cuda_X and set by _C.set_cuda_X). They are read when a kernel is chosen, so a
    CUDA graph captures the kernel they select."""
    def call():
        prev = {k: getattr(_C, f"cuda_{k}")() for k in settings}
        for k, v in settings.items():
            getattr(_C, f"set_cuda_{k}")(v)
        try:
            return fn()
        finally:
            for k, v in prev.items():
                getattr(_C, f"set_cuda_{k}")(v)
    return call


HBM = [None]  # the card's nominal HBM bytes/s, for the rows' share


def achieved(r: dict, hbm) -> str:
    """Bandwidth (and share of the nominal HBM figure) or TFLOP/s of a result row."""
    if "gbps" in r:
        frac = f" ({r['gbps'] * 1e9 / hbm:.0%} of HBM)" if hbm else ""
        return f"{r['gbps'] / 1e3:.2f} TB/s{frac}"
    if "tflops" in r:
        return f"{r['tflops']:.0f} TFLOP/s"
    return ""


def row_text(r: dict, hbm) -> str:
    return (f"| {r['kind']} | {r['N']}x{r['K']} | {r['M']} | {r['method']} | {r['us']:.1f} | {achieved(r, hbm)} | "
            f"{r['speedup']:.2f}x |")


# The tables of the docs section, one per kind of result: (kind, caption).
DOC_TABLES = [
    ("W4 g128", "W4 g128, bf16 activations, cold weights (N x K = out x in; achieved: bytes of weights, scales, "
                "x and y per call / time):"),
    ("int8", "int8 GEMM and int8-activation linear layers (cold weights; the hfquant int8_gemm and LLM.int8 "
             "rows, and bitsandbytes LLM.int8, run eagerly: they synchronize with the host):"),
    ("W4 path", "qlinear W4 g128 path switch, 4096x4096, bf16 x (one weight copy, so the weights stay in L2; "
                "bf16 F.linear alike):"),
]


def doc_section(run: dict) -> str:
    """The markdown of docs/benchmarks.md section `cuda` for a run (the dict --json writes)."""
    hbm, copy_bw = run.get("nominal_hbm"), run.get("copy_bw")
    nominal = f"nominal HBM {hbm / 1e12:.2f} TB/s" if hbm else "nominal HBM unknown"
    copy = f"; a device-to-device copy measured {copy_bw / 1e12:.2f} TB/s" if copy_bw else ""
    bnb = run.get("bitsandbytes")
    title = "## CUDA (`benchmarks/bench_cuda.py`)"
    if run.get("quick"):
        title += ": PLACEHOLDER from a `--quick` run (few rounds; do not quote)"
    if run.get("partial"):
        title += " (PARTIAL: the run stopped before its end; the rows it measured)"
    lines = [title, "", f"Command: `{run.get('command', 'python benchmarks/bench_cuda.py')}`", "",
             f"Card: {run['device']} ({nominal}{copy}); torch {run.get('torch', '?')}, CUDA {run.get('cuda', '?')}; "
             f"bitsandbytes {bnb if bnb else 'not available'}; hfquant source {run.get('git', 'unknown')}. "
             f"Run {run.get('date', 'unknown')}" + (f", {run['wall_s']:.0f} s." if "wall_s" in run else "."), "",
             f"Method: every method of a (shape, M) in one process, interleaved round by round, median of "
             f"{run.get('rounds', '?')} rounds; each round replays a CUDA graph of {run.get('inner', '?')} calls timed "
             "with CUDA events (GPU time; a Python loop of small calls would time the host). Each call uses another "
             "copy of the weights, copies of at least three times the L2 in all, so weights come from HBM as in "
             "decode. Ops that synchronize with the host run eagerly. vs bf16: time of bf16 F.linear (cuBLAS) / time "
             "of the row."]
    not_captured = run.get("not_captured") or []
    if not_captured:
        lines += ["", "Timed eagerly because a CUDA graph could not capture them: "
                  + ", ".join(sorted(not_captured)) + "."]
    results = run["results"]
    for kind, caption in DOC_TABLES:
        rows = [[f"{r['N']}x{r['K']}", str(r["M"]), r["method"], f"{r['us']:.1f}", achieved(r, hbm),
                 f"{r['speedup']:.2f}x"] for r in results if r["kind"] == kind]
        if rows:
            lines += ["", caption, "", common.md_table(["N x K", "M", "method", "us", "achieved", "vs bf16"], rows,
                                                       "lrlrrr")]
    if not results:
        lines += ["", "No results (the run stopped before its first measurement)."]
    return "\n".join(lines) + "\n"


def write_docs(path: Path, run: dict) -> None:
    """Replaces section `cuda` of the markdown file at path with the run's tables."""
    common.write_doc_section(path, "cuda", doc_section(run), DOC_INTRO)


def git_describe() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "csrc", "hfquant"],
                               capture_output=True, text=True).stdout.strip()
        return sha + (" + uncommitted changes in csrc/ or hfquant/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


SAVE = {"path": None, "run": None}  # --json target and the run dict, rewritten after every row


def save_run(run: dict, path: Path | None) -> None:
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(run, indent=1))
        tmp.replace(path)


def add(results: list, r: dict) -> None:
    """Records a result and prints its row at once (to stderr); with --json the file is
    rewritten too, so that a run stopped by a time limit still leaves what it measured."""
    results.append(r)
    print("  " + row_text(r, HBM[0]), file=sys.stderr, flush=True)
    if SAVE["run"] is not None:
        SAVE["run"]["not_captured"] = sorted(NOT_CAPTURED)
        save_run(SAVE["run"], SAVE["path"])


def bench_w4(results, rounds, inner, ms, sweep=False, bnb=None):
    gen = torch.Generator().manual_seed(0)
    for N, K in SHAPES:
        pw, ps, tiny = w4_setup(N, K, gen)
        w4_bytes = pw.numel() + ps.numel() * 4
        n4 = copies_for(w4_bytes)
        pws = [(pw.clone(), ps.clone()) for _ in range(n4)]
        tinys = [(tiny[0].clone(), tiny[1].clone()) for _ in range(n4)] if tiny else None
        wb = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02
        nb = copies_for(wb.numel() * 2)
        wbs = [wb.clone() for _ in range(nb)]
        nf4s = [bnb_nf4(bnb, wb) for _ in range(n4)] if bnb else []
        nf4s = nf4s if all(nf4s) else []
        for M in ms:
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            def q(p):
                return lambda: torch.ops.hfquant.qlinear(x, p[0], p[1], None, 4, 128, N, K)
            methods = {
                "bf16 F.linear": [lambda w=w: F.linear(x, w) for w in wbs],
                "hfquant W4 g128": [switched(q(p), skinny_max_m=0) for p in pws],
            }
            if M <= 64:
                methods["hfquant W4 skinny"] = [switched(q(p), skinny_max_m=64, skinny_segs=0) for p in pws]
                for segs in (2, 4, 6, 8) if sweep and M <= 16 else ():
                    methods[f"hfquant W4 skinny segs={segs}"] = [switched(q(p), skinny_max_m=64, skinny_segs=segs)
                                                                 for p in pws]
            if tinys:
                methods["torch int4pack_mm"] = [lambda t=t: torch._weight_int4pack_mm(x, t[0], 128, t[1])
                                                for t in tinys]
            if nf4s:
                methods["bitsandbytes NF4 g64"] = [lambda f=f: f(x) for f in nf4s]
            t = time_methods(methods, rounds, inner)
            io = (M * K + M * N) * 2
            for name, sec in t.items():
                nbytes = {"bf16 F.linear": N * K * 2,
                          "torch int4pack_mm": N * K // 2 + (K // 128) * N * 4,
                          "bitsandbytes NF4 g64": N * K // 2 + (K // 64) * N}.get(name, w4_bytes) + io
                add(results, dict(kind="W4 g128", N=N, K=K, M=M, method=name, us=sec * 1e6,
                                    gbps=nbytes / sec / 1e9, speedup=t["bf16 F.linear"] / sec))
        del pws, tinys, wbs
        torch.cuda.empty_cache()


def bench_int8(results, rounds, inner, ms_gemm, ms_llm, bnb=None):
    gen = torch.Generator().manual_seed(1)
    for N, K in SHAPES:
        w = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).cuda()
        pw, cs = torch.ops.hfquant.int8_pack(w)
        ws = torch.rand(N, device="cuda") * 0.01
        n8 = copies_for(pw.numel())
        pws = [pw.clone() for _ in range(n8)]
        wts = [p[:N, :K].t() for p in pws]  # [K, N] column-major views for torch._int_mm
        wb = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02
        wbs = [wb.clone() for _ in range(copies_for(wb.numel() * 2))]
        int8s = [bnb_int8(bnb, wb) for _ in range(n8)] if bnb else []
        int8s = int8s if all(l is not None for l in int8s) else []
        for M in sorted(set(ms_gemm) | set(ms_llm)):
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            methods = {"bf16 F.linear": [lambda w=w: F.linear(x, w) for w in wbs]}
            if M in ms_gemm:
                xq, xs, _ = torch.ops.hfquant.quantize_act(x, 0.0)
                methods["hfquant int8_gemm"] = [
                    lambda p=p: torch.ops.hfquant.int8_gemm(xq, xs, p, cs, ws, None, torch.bfloat16, N) for p in pws]
                methods["torch._int_mm"] = [lambda t=t: torch._int_mm(xq, t) for t in wts]
                methods["hfquant W8A8 linear"] = [
                    switched(lambda p=p: torch.ops.hfquant.int8_linear(x, p, cs, ws, None, None, 0.0, N), int8_lt=False)
                    for p in pws]
                methods["hfquant W8A8 linear, GEMM by cuBLASLt heuristic"] = [
                    switched(lambda p=p: torch.ops.hfquant.int8_linear(x, p, cs, ws, None, None, 0.0, N), int8_lt=True)
                    for p in pws]
            if M in ms_llm and int8s:
                xh = x.half()
                xh[:, torch.randperm(K, generator=gen)[:6].cuda()] = 20.0
                methods["bitsandbytes LLM.int8"] = [lambda l=l: l(xh) for l in int8s]
            if M in ms_llm:
                xo = x.clone()
                xo[:, torch.randperm(K, generator=gen)[:6].cuda()] = 20.0  # six outlier columns
                methods["hfquant LLM.int8"] = [
                    lambda p=p: torch.ops.hfquant.int8_linear(xo, p, cs, ws, None, None, 6.0, N) for p in pws]
            t = time_methods(methods, rounds, inner, EAGER)
            for name, sec in t.items():
                add(results, dict(kind="int8", N=N, K=K, M=M, method=name, us=sec * 1e6,
                                    tflops=2 * M * N * K / sec / 1e12, speedup=t["bf16 F.linear"] / sec))
        del pws, wts, wbs
        torch.cuda.empty_cache()


def bench_w4_large_m(results, rounds, inner):
    """The bf16/fp16 path switch of qlinear: mma.sync kernel (and the skinny kernel up to M = 64)
    vs dequantize + cuBLAS."""
    gen = torch.Generator().manual_seed(2)
    N, K = 4096, 4096
    pw, ps, _ = w4_setup(N, K, gen)
    wb = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
    for M in (16, 32, 48, 64, 128, 256, 512, 2048):
        x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")

        def q():
            return torch.ops.hfquant.qlinear(x, pw, ps, None, 4, 128, N, K)

        methods = {"bf16 F.linear": [lambda: F.linear(x, wb)],
                   "W4 mma kernel": [switched(q, gemm_min_m=1 << 30, skinny_max_m=0)],
                   "W4 dequant+cuBLAS": [switched(q, gemm_min_m=0, skinny_max_m=0)]}
        if M <= 64:
            methods["W4 skinny kernel"] = [switched(q, gemm_min_m=1 << 30, skinny_max_m=64)]
        t = time_methods(methods, rounds, inner)
        for name, sec in t.items():
            add(results, dict(kind="W4 path", N=N, K=K, M=M, method=name, us=sec * 1e6,
                              speedup=t["bf16 F.linear"] / sec))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, no path-switch table (a smoke run)")
    ap.add_argument("--sweep", action="store_true", help="also time the skinny kernel at each forced segments per block")
    ap.add_argument("--json", type=Path, default=None, help="save the run (card, versions, every row) to this file")
    ap.add_argument("--write-docs", action="store_true", help="replace section `cuda` of --docs with this run's tables")
    ap.add_argument("--docs", type=Path, default=DOCS, help="the markdown file --write-docs edits (docs/benchmarks.md)")
    ap.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                    help="measure nothing: print (with --write-docs: write) the tables of a run saved with --json")
    return ap.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    """The command of this run as the docs show it (file arguments by name only)."""
    parts = ["python benchmarks/bench_cuda.py"]
    parts += [flag for flag, on in (("--quick", args.quick), ("--sweep", args.sweep)) if on]
    if args.json:
        parts += ["--json", shlex.quote(args.json.name)]
    if args.write_docs:
        parts.append("--write-docs")
    return " ".join(parts)


def load_run(path: Path) -> dict:
    """A run saved with --json; ValueError with a one-line reason when the file is not one."""
    try:
        run = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"bench_cuda: cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"bench_cuda: {path} is not JSON ({exc})") from None
    if not (isinstance(run, dict) and isinstance(run.get("results"), list) and isinstance(run.get("device"), str)):
        raise ValueError(f"bench_cuda: {path} is not a run saved by bench_cuda.py --json (no device or results)")
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        try:
            run = load_run(args.from_json)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        if args.write_docs:
            write_docs(args.docs, run)
        else:
            print(doc_section(run))
        return 0
    if not (torch.cuda.is_available() and _C.cuda_built):
        print("bench_cuda: needs a GPU and hfquant built with HFQUANT_CUDA=1 (--from-json FILE writes the tables "
              "of a saved run without one)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rounds, inner = (5, 10) if args.quick else (15, 20)
    name = torch.cuda.get_device_name()
    hbm, copy_bw = nominal_hbm(name), copy_bandwidth()
    HBM[0] = hbm
    print(f"device: {name}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
          f"nominal HBM {hbm / 1e12 if hbm else float('nan'):.2f} TB/s; measured copy {copy_bw / 1e12:.2f} TB/s")
    results: list[dict] = []
    bnb = bitsandbytes()
    if bnb:
        print(f"bitsandbytes {bnb.__version__}")
    run = dict(device=name, torch=torch.__version__, cuda=torch.version.cuda, nominal_hbm=hbm, copy_bw=copy_bw,
               bitsandbytes=bnb.__version__ if bnb else None, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               command=command_line(args), git=git_describe(), quick=args.quick, rounds=rounds, inner=inner,
               partial=True, not_captured=[], results=results)
    SAVE.update(path=args.json, run=run)
    bench_w4(results, rounds, inner, [1, 4, 16, 32, 64], args.sweep, bnb)
    bench_int8(results, rounds, inner, [256, 1024, 4096], [512, 2048], bnb)
    if not args.quick:
        bench_w4_large_m(results, rounds, inner)
    print("\n| kind | N x K | M | method | us | achieved | vs bf16 |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for r in results:
        print(row_text(r, HBM[0]))
    run.update(partial=False, not_captured=sorted(NOT_CAPTURED), wall_s=time.perf_counter() - t0)
    save_run(run, args.json)
    if args.write_docs:
        write_docs(args.docs, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
