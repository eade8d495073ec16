"""Linear-layer benchmark: hfquant W4/W8 qlinear against torch's dense and quantized CPU paths.

One process; for every shape (benchmarks/shapes.py) and M, all competitors run
round-robin, one timed sample each per repetition (the order rotates every
repetition); warm-up rounds are discarded and the median per call is reported. Every
competitor reads its weights cold: it cycles through copies that together exceed the
L3 several times (--cold-mib). A read-bandwidth probe in the same process with the same
threads gives the roofline for "% BW". Before timing, every competitor's output is
checked against x @ W_ref^T for the weight it stands for; a wrong result is reported,
never timed.

    python benchmarks/bench_linear.py                       # all shapes, M = 1 8 128
    python benchmarks/bench_linear.py --quick --shapes smollm2-135m --m 1
    python benchmarks/bench_linear.py --isa avx2 --json out.json --write-docs
    python benchmarks/bench_linear.py --suite int8 --write-docs   # W8A8 / LLM.int8 vs fbgemm, F.linear

Convention: N = out_features, K = in_features; y[M, N] = x[M, K] @ W[N, K]^T.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

DOC_INTRO = "# Benchmarks\n"

# Environment that caps torch's own kernels to AVX2 (read once, at torch import), so that
# --isa avx2 emulates an AVX2-only machine for the peers too: ATen's dispatched kernels
# (int4pack/int8pack), oneDNN (bf16 matmul) and MKL (fp32 matmul). fbgemm (ao dynamic)
# has no such switch and keeps using AVX-512.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["all"],
                   help="shape names or model keys from benchmarks/shapes.py (default: all)")
    p.add_argument("--suite", choices=["weight-only", "int8", "lut"], default="weight-only",
                   help="weight-only: W4/W8 qlinear and their peers; int8: int8 activations (W8A8, LLM.int8 with "
                        "0.1%% outlier columns) against torch.ao's dynamic quantized Linear and F.linear")
    p.add_argument("--m", nargs="+", type=int, default=None,
                   help="rows of x (default: 1 8 128; --suite int8: 1 16 128 512)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    p.add_argument("--group-size", type=int, default=128, help="W4 group size (default: 128)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3-5 repetitions, 64 MiB cold set, 512 MiB bandwidth probe")
    p.add_argument("--isa", default=None,
                   help="force hfquant's kernel path (hfquant._C.set_cpu_isa), e.g. avx2; with avx2 torch is "
                        "capped to AVX2 as well (see --no-cap-torch)")
    p.add_argument("--int8-path", default=None,
                   help="--suite int8: force hfquant's int8 kernel (avx512vnni, avxvnni, avx2, portable)")
    p.add_argument("--no-cap-torch", action="store_true",
                   help="with --isa avx2: leave torch's kernels on their native ISA")
    p.add_argument("--reps", type=int, default=None, help="max timed repetitions per case (default 21, quick 5)")
    p.add_argument("--cold-mib", type=int, default=None,
                   help="bytes of weight copies each competitor cycles through (default 256, quick 64)")
    p.add_argument("--case-budget-s", type=float, default=None,
                   help="time budget per (shape, M) case; fewer repetitions (not below 5, quick 3) "
                        "when slow (default 12, quick 2)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="first wait up to S seconds until other processes use < 5%% of the CPUs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write all results to this file")
    p.add_argument("--write-docs", action="store_true", help="replace/append this run's section in --docs")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--docs-label", default=None,
                   help="section marker label (default: linear-<hfquant isa>, so a full run replaces the "
                        "--quick placeholder of the same kernel path)")
    a = p.parse_args(argv)
    a.m = a.m or ([1, 16, 128, 512] if a.suite == "int8" else [1, 8, 128])
    quick = a.quick
    a.reps = a.reps or (5 if quick else 21)
    a.min_reps = min(a.reps, 3 if quick else 5)
    a.warmup = 0 if quick else 1  # interleaved warm-up rounds after the 2 calibration calls
    a.cold_mib = a.cold_mib or (64 if quick else 256)
    a.case_budget_s = a.case_budget_s or (2.0 if quick else 12.0)
    a.target_s = 0.002 if quick else 0.005  # minimum length of one timed sample
    a.slow_call_s = 1.0  # a competitor slower than this per call is timed once, not repeated
    a.bw_mib, a.bw_reps = (512, 3) if quick else (1024, 7)
    return a


def cap_torch_isa(args: argparse.Namespace) -> dict[str, str]:
    """With --isa avx2, set AVX2_ENV (where unset); must run before torch is imported."""
    capped = {}
    if args.isa == "avx2" and not args.no_cap_torch:
        for k, v in AVX2_ENV.items():
            if k not in os.environ:
                os.environ[k] = capped[k] = v
    return capped


if __name__ == "__main__":
    ARGS = parse_args()
    cap_torch_isa(ARGS)  # before the imports below: torch reads these variables once

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import shapes as shapes_mod  # noqa: E402
from common import MiB, WeightPool, tensor_bytes  # noqa: E402

ACTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
        "fp32o": torch.float32}  # fp32o: x with 0.1% outlier columns (|x| = 20), for LLM.int8
# Allowed relative Frobenius error against x @ W_ref^T (W_ref: the exact weight the
# competitor stands for, computed in fp32): room for bf16/fp16 output rounding, while
# a layout or scale mistake (error ~1) fails. ao dynamic also quantizes x to 8 bits.
TOL = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 2e-2, "fp32o": 1e-3}
TOL_DYNAMIC = 5e-2


# ----------------------------------------------------------------------------- competitors

@dataclass
class Competitor:
    key: str  # unique within a case, e.g. "hfq-w4/bf16"
    label: str
    act: str  # activation dtype name (ACTS)
    fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None  # fn(x, weight copy) -> y
    pool: WeightPool | None = None
    call_bytes: int = 0  # weight + scale bytes one call reads
    ref_key: str = ""  # names the reference weight
    ref: Callable[[], torch.Tensor] | None = None  # fp32 [N, K] weight the output stands for
    tol: float = 0.0
    peer: str | None = None  # key of the torch peer for the "x peer" column
    reason: str | None = None  # set when n/a


class ShapeCtx:
    """One shape's float weight, its quantizations and reference weights (built lazily)."""

    def __init__(self, shape: shapes_mod.LinearShape, args: argparse.Namespace):
        self.shape, self.N, self.K = shape, shape.N, shape.K
        self.gs = args.group_size
        self.cold_bytes = args.cold_mib * MiB
        gen = torch.Generator().manual_seed(args.seed)
        self.w = torch.randn(self.N, self.K, generator=gen) * 0.02
        self._w4: dict[int, common.W4] = {}
        self._w8: common.W8 | None = None
        self._refs: dict[str, torch.Tensor] = {}

    def w4(self, gs: int) -> common.W4:
        if gs not in self._w4:
            self._w4[gs] = common.quantize_w4(self.w, gs)
        return self._w4[gs]

    def w8(self) -> common.W8:
        if self._w8 is None:
            self._w8 = common.quantize_w8(self.w)
        return self._w8

    def pool(self, template: Any, bytes_per_copy: int) -> WeightPool:
        return WeightPool(template, bytes_per_copy, self.cold_bytes)

    def ref_weight(self, c: Competitor) -> torch.Tensor:
        if c.ref_key not in self._refs:
            self._refs[c.ref_key] = c.ref().float().contiguous()
        return self._refs[c.ref_key]


def group_label(gs: int) -> str:
    return "per-ch" if gs == -1 else f"g{gs}"


def build_flinear(ctx: ShapeCtx) -> list[Competitor]:
    out = []
    for act in ("fp32", "bf16"):
        wt = ctx.w.to(ACTS[act])
        out.append(Competitor(
            f"F.linear/{act}", "F.linear", act, fn=lambda x, c: F.linear(x, c),
            pool=ctx.pool(wt, wt.nbytes), call_bytes=wt.nbytes,
            ref_key=f"dense/{act}", ref=lambda wt=wt: wt, tol=TOL[act]))
    return out


def build_hfquant(ctx: ShapeCtx, bits: int) -> list[Competitor]:
    from hfquant import ops

    N, K = ctx.N, ctx.K
    if bits == 4:
        gs, q, peer = ctx.gs, ctx.w4(ctx.gs), "int4pack/bf16"
    else:
        gs, q, peer = -1, ctx.w8(), "int8pack/bf16"
    pw, ps = ops.repack(q.qweight, q.scales, None, bits, gs, K)
    pool = ctx.pool((pw, ps), tensor_bytes(pw, ps))

    def fn(x, c):
        return ops.qlinear(x, c[0], c[1], None, bits, gs, N, K)

    return [Competitor(f"hfq-w{bits}/{act}", f"hfquant W{bits} {group_label(gs)}", act, fn=fn, pool=pool,
                       call_bytes=pool.bytes_per_copy, ref_key=f"w{bits}", ref=q.dequantize, tol=TOL[act],
                       peer=peer)
            for act in ("fp32", "bf16", "fp16")]


def build_hfquant_lut(ctx: ShapeCtx, bits: int, gs: int = -1) -> list[Competitor]:
    """Weight clustering: k-means codebooks (per row) and the LUT kernel."""
    from hfquant import ops
    from hfquant.algorithms.clustering import kmeans_quantize
    from hfquant.formats import dequantize_lut, pack_indices

    N, K = ctx.N, ctx.K
    r = kmeans_quantize(ctx.w, bits, gs, max_iter=10)
    qw = pack_indices(r.indices, bits)
    idx, tab = ops.lut_repack(qw, r.codebook, bits, gs, K)
    pool = ctx.pool((idx, tab), tensor_bytes(idx, tab))

    def fn(x, c):
        return ops.lut_linear(x, c[0], c[1], None, bits, gs, N, K)

    return [Competitor(f"hfq-lut{bits}/{act}", f"hfquant k-means {bits}-bit {group_label(gs)}", act, fn=fn,
                       pool=pool, call_bytes=pool.bytes_per_copy, ref_key=f"lut{bits}",
                       ref=lambda: dequantize_lut(qw, r.codebook, bits, gs, K, torch.float32), tol=TOL[act],
                       peer="hfq-w4/" + act)
            for act in ("fp32", "bf16")]


def int4pack_group(K: int, gs: int) -> int:
    """Group size for torch's int4pack: ours if K is a multiple of it, else the largest smaller one dividing K."""
    if gs != -1 and K % gs == 0:
        return gs
    for cand in (256, 128, 64, 32):
        if (gs == -1 or cand < gs) and K % cand == 0:
            return cand
    raise ValueError(f"K={K} is not a multiple of any group size torch's int4pack takes")


def build_int4pack(ctx: ShapeCtx) -> list[Competitor]:
    # torch's CPU int4 weight-only matmul (tinygemm layout, as torchao's Int4CPULayout uses it):
    #   packed = torch._convert_weight_to_int4pack_for_cpu(codes int32 [N, K] in 0..15, inner_k_tiles)
    #   y = torch._weight_int4pack_mm_for_cpu(x [M, K], packed, group_size, qScaleAndZeros)
    # with qScaleAndZeros [K/g, N, 2] = (scale, zero) in x's dtype and w = (code - 8) * scale + zero.
    # N must be a multiple of 16 and K of the group size (no ragged last group); on CPU
    # inner_k_tiles does not change the packing. Symmetric codes carry the +8 offset: zero = 0.
    g = int4pack_group(ctx.K, ctx.gs)
    q = ctx.w4(g)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.codes.contiguous(), 8)
    zero = torch.zeros_like(q.scales) if q.zeros is None else (8 - q.zeros.float()) * q.scales
    sz = torch.stack([q.scales, zero], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
    sz_bf16, sz_f32 = sz.bfloat16(), sz.float()
    pool = ctx.pool((packed, sz_bf16, sz_f32), tensor_bytes(packed, sz_bf16, sz_f32))
    label = f"torch int4pack {group_label(g)}" + ("" if g == ctx.gs else f" (K%{ctx.gs}≠0)")
    out = []
    for act, i in (("bf16", 1), ("fp32", 2)):
        out.append(Competitor(
            f"int4pack/{act}", label, act,
            fn=lambda x, c, i=i: torch._weight_int4pack_mm_for_cpu(x, c[0], g, c[i]),
            pool=pool, call_bytes=packed.nbytes + (sz_bf16 if i == 1 else sz_f32).nbytes,
            ref_key=f"int4pack/{act}", ref=lambda act=act: q.dequantize(ACTS[act]), tol=TOL[act]))
    return out


def build_int8pack(ctx: ShapeCtx) -> list[Competitor]:
    # torch._weight_int8pack_mm(x [M, K] (bf16/fp16/fp32), w int8 [N, K], scales [N] in x's dtype)
    #   = x @ (w * scales[:, None])^T; no packing step, the int8 weight is used as is.
    q = ctx.w8()
    s_bf16, s_f32 = q.scales[:, 0].bfloat16(), q.scales[:, 0].float()
    pool = ctx.pool((q.qweight, s_bf16, s_f32), tensor_bytes(q.qweight, s_bf16, s_f32))
    out = []
    for act, i in (("bf16", 1), ("fp32", 2)):
        out.append(Competitor(
            f"int8pack/{act}", "torch int8pack per-ch", act,
            fn=lambda x, c, i=i: torch._weight_int8pack_mm(x, c[0], c[i]), pool=pool,
            call_bytes=q.qweight.nbytes + (s_bf16 if i == 1 else s_f32).nbytes,
            ref_key=f"int8pack/{act}", ref=lambda act=act: q.dequantize(ACTS[act]), tol=TOL[act]))
    return out


def build_ao_dynamic(ctx: ShapeCtx) -> list[Competitor]:
    # Per-channel qint8 weights (fbgemm/x86 engine); x is quantized to uint8 per call, so
    # this is W8A8 dynamic, not weight-only. Copies via deepcopy (repacks the weight).
    import torch.ao.quantization as aq

    lin = torch.nn.Linear(ctx.K, ctx.N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(ctx.w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager-mode quantization is deprecated in favour of torchao
        qm = aq.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear: aq.per_channel_dynamic_qconfig},
                                 dtype=torch.qint8)[0]
    if not isinstance(qm, torch.ao.nn.quantized.dynamic.Linear):
        raise RuntimeError(f"quantize_dynamic returned {type(qm).__name__}, not a dynamic quantized Linear")
    # int8 weight + per-row scale, zero point and column offset (fbgemm's packed matrix).
    nbytes = ctx.N * ctx.K + 12 * ctx.N
    return [Competitor("ao-dyn/fp32", "ao dynamic int8 per-ch", "fp32", fn=lambda x, c: c(x),
                       pool=ctx.pool(lambda: copy.deepcopy(qm), nbytes), call_bytes=nbytes,
                       ref_key="dense/fp32", ref=lambda: ctx.w, tol=TOL_DYNAMIC)]


def build_hfquant_int8(ctx: ShapeCtx) -> list[Competitor]:
    # hfquant::int8_linear: x quantized per row to int8 inside the op, exact int32 GEMM,
    # per-row x per-channel scales; LLM.int8 adds the outlier columns in fp32.
    from hfquant import ops

    q, N = ctx.w8(), ctx.N
    pw, cs = ops.int8_pack(q.qweight)
    ws = q.scales[:, 0].float().contiguous()
    pool = ctx.pool((pw, cs, ws), tensor_bytes(pw, cs, ws))

    def make(threshold):
        return lambda x, c: ops.int8_linear(x, c[0], c[1], c[2], None, None, threshold, N)

    common_args = dict(pool=pool, call_bytes=pool.bytes_per_copy, ref_key="w8", ref=q.dequantize)
    return [Competitor("hfq-w8a8/fp32", "hfquant W8A8", "fp32", fn=make(0.0), tol=TOL_DYNAMIC, peer="ao-dyn/fp32",
                       **common_args),
            Competitor("hfq-w8a8/bf16", "hfquant W8A8", "bf16", fn=make(0.0), tol=TOL_DYNAMIC, peer="ao-dyn/fp32",
                       **common_args),
            Competitor("hfq-llmint8/fp32o", "hfquant LLM.int8 (t=6)", "fp32o", fn=make(6.0), tol=TOL_DYNAMIC,
                       peer="hfq-w8a8/fp32", **common_args)]


# (builder, [(key, label, act)]) in table order; the list names the rows when a builder fails.
BUILDERS: list[tuple[Callable[[ShapeCtx], list[Competitor]], list[tuple[str, str, str]]]] = [
    (build_flinear, [("F.linear/fp32", "F.linear", "fp32"), ("F.linear/bf16", "F.linear", "bf16")]),
    (lambda ctx: build_hfquant(ctx, 4), [(f"hfq-w4/{a}", "hfquant W4", a) for a in ("fp32", "bf16", "fp16")]),
    (build_int4pack, [("int4pack/bf16", "torch int4pack", "bf16"), ("int4pack/fp32", "torch int4pack", "fp32")]),
    (lambda ctx: build_hfquant(ctx, 8), [(f"hfq-w8/{a}", "hfquant W8 per-ch", a) for a in ("fp32", "bf16", "fp16")]),
    (build_int8pack, [("int8pack/bf16", "torch int8pack per-ch", "bf16"),
                      ("int8pack/fp32", "torch int8pack per-ch", "fp32")]),
    (build_ao_dynamic, [("ao-dyn/fp32", "ao dynamic int8 per-ch", "fp32")]),
]
BUILDERS_LUT = [
    BUILDERS[0],
    (lambda ctx: build_hfquant(ctx, 4), [(f"hfq-w4/{a}", "hfquant W4", a) for a in ("fp32", "bf16", "fp16")]),
    (lambda ctx: build_hfquant_lut(ctx, 4), [(f"hfq-lut4/{a}", "hfquant k-means 4-bit", a) for a in ("fp32", "bf16")]),
    (lambda ctx: build_hfquant_lut(ctx, 3), [(f"hfq-lut3/{a}", "hfquant k-means 3-bit", a) for a in ("fp32", "bf16")]),
]
BUILDERS_INT8 = [
    BUILDERS[0],
    (lambda ctx: [c for c in build_hfquant(ctx, 8) if c.act == "fp32"], [("hfq-w8/fp32", "hfquant W8 per-ch",
                                                                          "fp32")]),
    (build_hfquant_int8, [("hfq-w8a8/fp32", "hfquant W8A8", "fp32"), ("hfq-w8a8/bf16", "hfquant W8A8", "bf16"),
                          ("hfq-llmint8/fp32o", "hfquant LLM.int8 (t=6)", "fp32o")]),
    BUILDERS[-1],
]


def short_reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    msg = msg if len(msg) <= 120 else msg[:117] + "..."
    return f"{type(exc).__name__}: {msg}".replace("|", "/")


def build_all(ctx: ShapeCtx, suite: str = "weight-only") -> list[Competitor]:
    comps: list[Competitor] = []
    for build, rows in {"int8": BUILDERS_INT8, "lut": BUILDERS_LUT}.get(suite, BUILDERS):
        try:
            comps += build(ctx)
        except Exception as exc:  # an unavailable peer is reported as n/a, the rest still runs
            reason = short_reason(exc)
            comps += [Competitor(k, lbl, act, reason=reason) for k, lbl, act in rows]
    return comps


# ----------------------------------------------------------------------------- measuring

def check(c: Competitor, ctx: ShapeCtx, x: torch.Tensor,
          ref_out: dict[tuple[str, str], torch.Tensor]) -> float | None:
    """Relative error of c's output against x @ W_ref^T; sets c.reason when wrong."""
    try:
        y = c.fn(x, c.pool.copies[0])
    except Exception as exc:
        c.reason = short_reason(exc)
        return None
    M = x.shape[0]
    if tuple(y.shape) != (M, ctx.N):
        c.reason = f"wrong output shape {tuple(y.shape)}, expected {(M, ctx.N)}"
        return None
    key = (c.ref_key, c.act)
    if key not in ref_out:
        ref_out[key] = (x.float() @ ctx.ref_weight(c).t()).double()
    r = ref_out[key]
    rel = ((y.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
    if not math.isfinite(rel) or rel > c.tol:
        c.reason = f"WRONG RESULT: rel. error {rel:.3g} > {c.tol:g}"
    return rel


def time_case(live: list[Competitor], xs: dict[str, torch.Tensor], args: argparse.Namespace
              ) -> tuple[dict[str, common.Timing], dict[str, int], int]:
    """Round-robin timing: per repetition one sample (``inner`` calls) of every competitor.

    Two calls each first (warm-up; the second sizes the sample to >= args.target_s), then
    args.warmup discarded rounds, then as many repetitions as the case budget allows. A
    competitor whose second call took longer than args.slow_call_s keeps that one call
    as its only sample and stays out of the repetitions (some fp32 peer paths take
    seconds at M = 128 and would otherwise dominate the run time).
    """
    inner: dict[str, int] = {}
    timings = {c.key: common.Timing() for c in live}
    est = 0.0
    for c in list(live):
        try:
            x = xs[c.act]
            c.fn(x, c.pool.next())
            t0 = time.perf_counter()
            c.fn(x, c.pool.next())
            t = time.perf_counter() - t0
        except Exception as exc:
            c.reason = short_reason(exc)
            live.remove(c)
            continue
        inner[c.key] = max(1, min(100_000, math.ceil(args.target_s / max(t, 1e-7))))
        if t > args.slow_call_s:
            timings[c.key].samples.append(t)
            live.remove(c)
            continue
        est += inner[c.key] * t
    reps = int(args.case_budget_s / max(est, 1e-9)) - args.warmup
    reps = max(args.min_reps, min(args.reps, reps))
    n = len(live)
    for r in range(args.warmup + reps if n else 0):
        order = live[r % n:] + live[:r % n]  # rotate: no competitor always goes first
        for c in order:
            if c.reason:
                continue
            fn, pool, x, k = c.fn, c.pool, xs[c.act], inner[c.key]
            try:
                t0 = time.perf_counter()
                for _ in range(k):
                    fn(x, pool.next())
                dt = (time.perf_counter() - t0) / k
            except Exception as exc:
                c.reason = short_reason(exc)
                continue
            if r >= args.warmup:
                timings[c.key].samples.append(dt)
    return timings, inner, reps


# ----------------------------------------------------------------------------- report

SUMMARY_COLS = [("F.linear/fp32", "F.linear fp32"), ("F.linear/bf16", "F.linear bf16"),
                ("hfq-w4/fp32", "hfq W4 fp32"), ("hfq-w4/bf16", "hfq W4 bf16"), ("int4pack/bf16", "int4pack bf16"),
                ("hfq-w8/fp32", "hfq W8 fp32"), ("hfq-w8/bf16", "hfq W8 bf16"), ("int8pack/bf16", "int8pack bf16"),
                ("ao-dyn/fp32", "ao dyn int8 fp32")]
SUMMARY_COLS_LUT = [("F.linear/fp32", "F.linear fp32"), ("F.linear/bf16", "F.linear bf16"),
                    ("hfq-w4/fp32", "hfq W4 fp32"), ("hfq-w4/bf16", "hfq W4 bf16"),
                    ("hfq-lut4/fp32", "hfq k-means 4-bit fp32"), ("hfq-lut4/bf16", "hfq k-means 4-bit bf16"),
                    ("hfq-lut3/fp32", "hfq k-means 3-bit fp32")]
SUMMARY_COLS_INT8 = [("F.linear/fp32", "F.linear fp32"), ("F.linear/bf16", "F.linear bf16"),
                     ("hfq-w8/fp32", "hfq W8 (weight-only) fp32"), ("ao-dyn/fp32", "ao dyn int8 fp32"),
                     ("hfq-w8a8/fp32", "hfq W8A8 fp32"), ("hfq-w8a8/bf16", "hfq W8A8 bf16"),
                     ("hfq-llmint8/fp32o", "hfq LLM.int8 fp32, 0.1% outliers")]


def fmt_us(us: float) -> str:
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}" if us >= 10 else f"{us:.2f}"


def fmt_mb(b: int) -> str:
    mb = b / 1e6
    return f"{mb:.1f}" if mb >= 10 else f"{mb:.2f}" if mb >= 0.1 else f"{mb:.3f}"


def case_table(rows: list[dict[str, Any]]) -> str:
    by_key = {r["key"]: r for r in rows}

    def speedup(base_key: str, r: dict[str, Any]) -> str:
        b = by_key.get(base_key)
        if not b or b.get("median_us") is None or r.get("median_us") is None:
            return "-"
        return f"{b['median_us'] / r['median_us']:.2f}"

    out = []
    for r in rows:
        if r.get("median_us") is None:
            out.append([r["label"], r["act"], fmt_mb(r["call_bytes"]) if r.get("call_bytes") else "-",
                        f"n/a ({r['reason']})", "", "", "", "", ""])
            continue
        spread = f"{(r['q3_us'] - r['q1_us']) / r['median_us'] * 100:.0f}%" if r["reps"] > 1 else "1 call"
        out.append([r["label"], r["act"], fmt_mb(r["call_bytes"]), fmt_us(r["median_us"]), spread,
                    speedup("F.linear/fp32", r), speedup(r["peer"], r) if r.get("peer") else "",
                    f"{r['gbps']:.1f}", f"{r['pct_bw']:.0f}%"])
    return common.md_table(["competitor", "x", "weights MB", "µs/call", "IQR", "× F.linear fp32",
                            "× torch peer", "GB/s", "% BW"], out, "llrrrrrrr")


def summary_table(results: list[dict[str, Any]], cases: list[tuple[str, int]], cols=None) -> str:
    cols = cols or SUMMARY_COLS
    idx = {(r["shape"], r["M"], r["key"]): r for r in results}
    rows = []
    for shape, M in cases:
        cells = []
        for key, _ in cols:
            r = idx.get((shape, M, key))
            cells.append(fmt_us(r["median_us"]) if r and r.get("median_us") is not None else "n/a")
        rows.append([shape, str(M), *cells])
    return common.md_table(["shape", "M", *[h for _, h in cols]], rows)


def git_describe() -> str:
    import subprocess

    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "csrc", "hfquant"],
                               capture_output=True, text=True).stdout.strip()
        return sha + (" + uncommitted changes in csrc/ or hfquant/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_line(others: dict[str, float] | None, before: float | None) -> str:
    if others is None:
        return "Load from other processes during the run: unknown (no /proc/stat)."
    line = (f"Other processes used {others['other_pct']:.1f}% of the CPUs during the run "
            f"({before:.0f}% just before it; hypervisor steal {others['steal_pct']:.1f}%).")
    if others["other_pct"] > 5 or others["steal_pct"] > 5:
        line = "**WARNING: the machine was not quiet; timings are distorted.** " + line
    return line


def format_report(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    a = meta["settings"]
    bw = meta["bandwidth"]
    isa = meta["system"].get("hfquant_isa", "n/a")
    int8 = a.get("suite") == "int8"
    if int8:
        isa = f"{isa} (int8 GEMM: {meta['system'].get('hfquant_int8_path', 'n/a')})"
    lut = a.get("suite") == "lut"
    what = "Int8 activations (W8A8, LLM.int8)" if int8 else ("Weight clustering (LUT kernel)" if lut else
                                                             "Linear layers")
    if a["quick"]:
        title = f"{what}, hfquant path {isa}: PLACEHOLDER from a smoke run (`--quick`)"
        note = ["", "**Placeholder:** few repetitions and a small cold set; do not quote these numbers. The full run "
                "(the same command without `--quick`) replaces this section.", ""]
    else:
        title, note = f"{what}, hfquant path {isa}: full run", [""]
    lines = [f"### {title}", *note, f"Command: `{meta['command']}`", "", common.header_line(meta["system"]) + ".", "",
             f"Run {meta['date']}, hfquant source {meta['git']}, {meta['wall_s']:.0f} s.",
             load_line(meta.get("other_load"), meta["system"].get("other_pct_before") or 0.0),
             f"Measured read bandwidth ({a['threads']} threads, {bw['start']['buffer_mib']:.0f} MiB buffer, "
             f"median of {a['bw_reps']}): start {bw['start']['best']:.1f} GB/s "
             f"(sum fp32 {bw['start']['sum_f32']:.1f}, amax u8 {bw['start']['amax_u8']:.1f}), end "
             f"{bw['end']['best']:.1f} GB/s; % BW uses {bw['used']:.1f} GB/s.",
             f"Cold weights: each competitor cycles through >= {a['cold_mib']} MiB of weight copies. "
             f"Up to {a['reps']} interleaved repetitions per case (fewer, not below {a['min_reps']}, when a case "
             f"would take over {a['case_budget_s']:g} s); warm-up: 2 calls each, then {a['warmup']} interleaved "
             f"round(s), discarded; "
             f"each sample lasts >= {a['target_s'] * 1e3:g} ms. W4 group size {a['group_size']}.",
             "", "Median µs per call (x @ W^T, N = out_features, K = in_features):", "",
             summary_table(results, meta["cases"], SUMMARY_COLS_INT8 if int8 else SUMMARY_COLS_LUT if lut else SUMMARY_COLS), ""]
    shapes = {s.name: s for s in shapes_mod.SHAPES.values()}
    for shape, M in meta["cases"]:
        rows = [r for r in results if r["shape"] == shape and r["M"] == M]
        lines += [f"#### {shapes[shape].describe()}, M={M}", "", case_table(rows), ""]
    peers = ("The peer of the hfquant W8A8 rows is torch.ao's dynamic quantized Linear (fbgemm, also W8A8 "
             "dynamic); of the LLM.int8 row, hfquant W8A8 with fp32 x (the cost of the outlier split). LLM.int8 "
             "runs on x with 0.1% of its columns (at least one) set to +-20, above the threshold 6."
             if int8 else "The peer of the k-means (LUT kernel) rows is hfquant W4 with the same x dtype; their "
             "codebooks are per output row (16 or 8 fp32 entries), indices 4 bits per weight in the kernel layout "
             "whatever the bits." if lut else "The torch peer of the hfquant W4 rows is torch int4pack with bf16 x, of the W8 rows torch "
             "int8pack with bf16 x.")
    lines += ["`× F.linear fp32` and `× torch peer` are speed-ups (time of the other / time of this row; > 1 is "
              f"faster). {peers} `weights MB` = bytes of weights and scales one call reads (1 MB = 1e6 B); "
              "GB/s = that / time; % BW against the measured read bandwidth. IQR = (q3 - q1) / median of the "
              f"samples; `1 call`: slower than {a['slow_call_s']:g} s per call, timed once after one warm-up "
              "call instead of repeated."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def run(args: argparse.Namespace, command: str) -> int:
    torch.set_num_threads(args.threads)
    for flag, value, setter in (("--isa", args.isa, "set_cpu_isa"), ("--int8-path", args.int8_path, "set_int8_path")):
        if not value:
            continue
        try:
            from hfquant._ext import _C

            getattr(_C, setter)(value)
        except Exception as exc:
            print(f"{flag} {value}: {short_reason(exc)}", file=sys.stderr)
            return 2
    try:
        selected = shapes_mod.select(args.shapes)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    # Other processes' CPU use over 2 s before the start (waiting up to --wait-quiet for < 5%).
    busy_before = common.wait_quiet(args.wait_quiet)
    info = common.system_info(args.threads)
    info["other_pct_before"] = busy_before
    print(common.header_line(info), file=sys.stderr)
    if busy_before is not None and busy_before > 5:
        print(f"WARNING: other processes use {busy_before:.0f}% of the CPUs: timings will be noisy "
              "(--wait-quiet S waits for a quiet machine)", file=sys.stderr)
    t_start = time.perf_counter()
    monitor = common.CpuMonitor()
    bw_start = common.measure_bandwidth(args.bw_mib * MiB, args.bw_reps)
    print(f"bandwidth {bw_start['best']:.1f} GB/s", file=sys.stderr)

    results: list[dict[str, Any]] = []
    cases: list[tuple[str, int]] = []
    wrong = 0
    n_cases = len(selected) * len(args.m)
    for shape in selected:
        t_build = time.perf_counter()
        ctx = ShapeCtx(shape, args)
        comps = build_all(ctx, args.suite)
        print(f"{shape.describe()}: built {sum(c.reason is None for c in comps)}/{len(comps)} competitors "
              f"in {time.perf_counter() - t_build:.1f} s", file=sys.stderr)
        for M in args.m:
            t_case = time.perf_counter()
            gen = torch.Generator().manual_seed(args.seed + M)
            x32 = torch.randn(M, shape.K, generator=gen)
            xs = {name: x32.to(dt) for name, dt in ACTS.items()}
            cols = torch.randperm(shape.K, generator=gen)[:max(1, round(shape.K / 1000))]
            xs["fp32o"] = x32.clone()
            xs["fp32o"][:, cols] = 20.0 * torch.sign(x32[:, cols])
            case = [copy.copy(c) for c in comps]  # per-case status; pools are shared
            ref_out: dict[tuple[str, str], torch.Tensor] = {}
            errs = {c.key: (check(c, ctx, xs[c.act], ref_out) if c.reason is None else None) for c in case}
            wrong += sum(1 for c in case if c.reason and c.reason.startswith("WRONG"))
            live = [c for c in case if c.reason is None]
            timings, inner, reps = time_case(live, xs, args)
            for c in case:
                row: dict[str, Any] = {
                    "shape": shape.name, "N": shape.N, "K": shape.K, "M": M, "key": c.key, "label": c.label,
                    "act": c.act, "peer": c.peer, "call_bytes": c.call_bytes, "rel_err": errs.get(c.key),
                    "tol": c.tol, "reason": c.reason}
                if c.reason is None and timings.get(c.key) and timings[c.key].samples:
                    row.update(timings[c.key].summary_us())
                    row.update(reps=len(timings[c.key].samples), inner=inner[c.key], copies=c.pool.n,
                               cold_mib=c.pool.total_bytes / MiB,
                               gbps=c.call_bytes / (row["median_us"] * 1e-6) / 1e9)
                else:
                    row["median_us"] = None
                results.append(row)
            cases.append((shape.name, M))
            print(f"[{len(cases)}/{n_cases}] {shape.name} M={M}: {len(live)} repeated ({reps} reps), "
                  f"{time.perf_counter() - t_case:.1f} s", file=sys.stderr)
        del ctx, comps
    bw_end = common.measure_bandwidth(args.bw_mib * MiB, args.bw_reps)
    bw_used = max(bw_start["best"], bw_end["best"])
    others = monitor.stop()
    for r in results:
        if r.get("median_us") is not None:
            r["pct_bw"] = r["gbps"] / bw_used * 100

    settings = {k: getattr(args, k) for k in (
        "quick", "threads", "group_size", "reps", "min_reps", "warmup", "cold_mib", "case_budget_s", "target_s",
        "slow_call_s", "bw_mib", "bw_reps", "isa", "seed", "m", "shapes", "suite", "int8_path")}
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": git_describe(),
            "system": info, "settings": settings, "cases": cases,
            "bandwidth": {"start": bw_start, "end": bw_end, "used": bw_used},
            "other_load": others, "wall_s": time.perf_counter() - t_start}
    report = format_report(meta, results)
    print(report)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    if args.write_docs:
        isa = info.get("hfquant_isa", "none")
        int8 = info.get("hfquant_int8_path", "none")
        label = args.docs_label or (f"int8-{isa}-{int8}" if args.suite == "int8" else
                                    f"lut-{isa}" if args.suite == "lut" else f"linear-{isa}")
        common.write_doc_section(args.docs, label, report, DOC_INTRO)
        print(f"wrote section {label!r} of {args.docs}", file=sys.stderr)
    print(f"total {meta['wall_s']:.0f} s", file=sys.stderr)
    if others and others["other_pct"] > 5:
        print(f"WARNING: other processes used {others['other_pct']:.0f}% of the CPUs during the run", file=sys.stderr)
    if wrong:
        print(f"{wrong} competitor result(s) failed the correctness check (see the tables)", file=sys.stderr)
    return 1 if wrong else 0


def main(argv: list[str] | None = None) -> int:
    args = ARGS if argv is None and "ARGS" in globals() else parse_args(argv)
    command = common.command_line(__file__, argv)
    return run(args, command)


if __name__ == "__main__":
    sys.exit(main())
