"""hfquant::repack and hfquant::qlinear (CPU) against their pure-torch twins in hfquant/ref.py.

Every kernel path this CPU can run is forced in turn (the ``isa`` fixture). Which of the
GEMV kernels and the blocked path (dequantize + GEMM) serves a call depends on M, the
dtype, the ISA and the layer size (tiny layers always take GEMV), so the blocked path is
covered independently of those defaults: a subprocess test forces each path for every
case with HFQUANT_GEMV_MAX_M and HFQUANT_QGEMM, and the realistic shape crosses the
default threshold.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import hfquant.ops  # noqa: F401  (registers the fake kernels)
from _utils import assert_close
from hfquant import ref
from hfquant._ext import _C

ISAS = _C.available_isas()
GROUP_SIZES = [-1, 32, 64, 128, 256]
# (N, K): odd N; K ragged against every group size (576 = 4.5 x 128), K < 32, K = 1
SHAPES = [(1, 1), (3, 17), (17, 300), (37, 576)]
# M = 1 (decode), 3 (M-block remainders), 17 (past a multiple of the kernels' M blocks), 128
MS = [1, 3, 17, 128]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _name(v):
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    return str(v)


def make_quantized(N, K, bits, group_size, asym, gen, codes=None, scale=None):
    """Random canonical checkpoint tensors (qweight, scales, zeros) as repack takes them."""
    _, G = ref.group_geometry(group_size, K)
    if codes is None:
        v = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.int32)
    else:
        v = torch.full((N, K), codes, dtype=torch.int32)
    if bits == 4:
        vp = torch.nn.functional.pad(v, (0, K % 2))
        qweight = (vp[:, 0::2] | (vp[:, 1::2] << 4)).to(torch.uint8)
    else:
        qweight = v.to(torch.uint8) if asym else (v - 128).to(torch.int8)
    if scale is None:
        scales = torch.rand(N, G, generator=gen) * 0.02 + 0.001
    else:
        scales = torch.full((N, G), float(scale))
    zeros = torch.randint(0, 1 << bits, (N, G), generator=gen, dtype=torch.int32).to(torch.uint8) if asym else None
    return qweight, scales, zeros


def qlinear_ref64(x, w, sb, bias, bits, gs, N, K):
    """The twin in float64 (x and bias promoted), the reference for every dtype."""
    b = None if bias is None else bias.double()
    return ref.qlinear_ref(x.double(), w, sb, b, bits, gs, N, K)


def step_scale(x, sb, gs, N, K):
    """max of |x| @ S^T, S[n, k] = the scale of (n, k): the output of a one-step weight."""
    s = sb[:, :, 0, :].permute(0, 2, 1).reshape(-1, sb.shape[1])[:N].double()  # [N, G]
    gsz = ref.group_geometry(gs, K)[0]
    S = s.repeat_interleave(gsz, dim=1)[:, :K]
    return (x.reshape(-1, K).double().abs() @ S.t()).max().item()


def check(y, x, w, sb, bias, bits, gs, N, K, dtype, msg):
    want = qlinear_ref64(x.reshape(-1, K), w, sb, bias, bits, gs, N, K).reshape(*x.shape[:-1], N)
    assert_close(y, want, dtype, msg, scale=step_scale(x, sb, gs, N, K))


# ---------------------------------------------------------------------------- repack


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_repack_matches_ref(bits, group_size, asym):
    gen = torch.Generator().manual_seed(1)
    for N, K in SHAPES + [(8, 64)]:
        qw, sc, z = make_quantized(N, K, bits, group_size, asym, gen)
        for scales in (sc, sc.to(torch.bfloat16)):
            got = torch.ops.hfquant.repack(qw, scales, z, bits, group_size, K)
            want = ref.repack_ref(qw, scales, z, bits, group_size, K)
            for g, w, what in zip(got, want, ("packed_weight", "packed_scales")):
                assert g.dtype == w.dtype and torch.equal(g, w), f"{what} differs for N={N} K={K}"


# --------------------------------------------------------------------------- qlinear


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_qlinear_matches_ref(isa, bits, group_size, dtype):
    gen = torch.Generator().manual_seed(2)
    for i, (N, K) in enumerate(SHAPES):
        for j, M in enumerate(MS):
            # symmetric/asymmetric and bias/no bias alternate over the (shape, M) grid
            asym, with_bias = (i + j) % 2 == 1, (i + 2 * j) % 3 != 0
            qw, sc, z = make_quantized(N, K, bits, group_size, asym, gen)
            w, sb = torch.ops.hfquant.repack(qw, sc, z, bits, group_size, K)
            x = torch.randn(M, K, generator=gen).to(dtype)
            bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
            y = torch.ops.hfquant.qlinear(x, w, sb, bias, bits, group_size, N, K)
            assert y.dtype == dtype and y.shape == (M, N)
            check(y, x, w, sb, bias, bits, group_size, N, K, dtype,
                  f"{isa} N={N} K={K} M={M} asym={asym} bias={with_bias}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_qlinear_realistic_shape(isa, bits, dtype):
    """A real projection size (576 x 1536, group 128 and per channel) at decode and prefill M."""
    gen = torch.Generator().manual_seed(3)
    N, K = 576, 1536
    for gs in (128, -1):
        qw, sc, z = make_quantized(N, K, bits, gs, gs == 128, gen)
        w, sb = torch.ops.hfquant.repack(qw, sc, z, bits, gs, K)
        bias = torch.randn(N, generator=gen).to(dtype)
        for M in (1, 5, 33) if isa != "portable" else (1, 33):
            x = torch.randn(M, K, generator=gen).to(dtype)
            y = torch.ops.hfquant.qlinear(x, w, sb, bias, bits, gs, N, K)
            check(y, x, w, sb, bias, bits, gs, N, K, dtype, f"{isa} g{gs} M={M}")


EDGES = {
    "codes-min": dict(codes=0),
    "codes-max": dict(codes="max"),
    "zero-scales": dict(scale=0.0),
    "large-scales": dict(scale=1e4),
}


@pytest.mark.parametrize("edge", list(EDGES), ids=str)
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_qlinear_edge_values(isa, bits, edge):
    gen = torch.Generator().manual_seed(4)
    kw = dict(EDGES[edge])
    if kw.get("codes") == "max":
        kw["codes"] = (1 << bits) - 1
    N, K, gs = 17, 300, 64
    for asym in (False, True):
        qw, sc, z = make_quantized(N, K, bits, gs, asym, gen, **kw)
        w, sb = torch.ops.hfquant.repack(qw, sc, z, bits, gs, K)
        for M in (1, 5, 40):
            x = torch.randn(M, K, generator=gen)
            x[:, ::3] = 0.0  # exact zeros among the activations
            x[-1] = 0.0  # and one all-zero row
            for dtype in DTYPES:
                xd = x.to(dtype)
                y = torch.ops.hfquant.qlinear(xd, w, sb, None, bits, gs, N, K)
                check(y, xd, w, sb, None, bits, gs, N, K, dtype, f"{isa} {edge} asym={asym} M={M} {dtype}")
                assert torch.all(y[-1] == 0), "an all-zero x row must give exactly zero"
                if edge == "zero-scales":
                    assert torch.all(y == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_qlinear_strided_and_batched_x(isa, dtype):
    """Non-contiguous x (column stride 2, row-strided slice, transposed) and 3-D x."""
    gen = torch.Generator().manual_seed(5)
    N, K, bits, gs = 37, 96, 4, 32
    qw, sc, z = make_quantized(N, K, bits, gs, True, gen)
    w, sb = torch.ops.hfquant.repack(qw, sc, z, bits, gs, K)
    big = torch.randn(40, 2 * K, generator=gen).to(dtype)
    views = {
        "col-stride-2": big[:3, ::2],
        "row-slice": big[:5, K // 2:K // 2 + K],
        "transposed": big[:, :K].t().contiguous().t()[:20],
        "3d": big[:30, :K].reshape(2, 15, K),
        "3d-blocked": big[:, :K].reshape(2, 20, K).repeat(1, 4, 1),
    }
    for name, x in views.items():
        y = torch.ops.hfquant.qlinear(x, w, sb, None, bits, gs, N, K)
        assert y.shape == (*x.shape[:-1], N), name
        check(y, x, w, sb, None, bits, gs, N, K, dtype, f"{isa} {name}")


_FORCE_PATH_SCRIPT = r"""
import itertools, torch
from hfquant._ext import _C
from hfquant import ref
torch.set_num_threads(1)  # correctness only; thread splits are covered in-process
gen = torch.Generator().manual_seed(6)
for isa in _C.available_isas():
    _C.set_cpu_isa(isa)
    shapes = ((3, 17), (17, 300), (37, 576))
    for bits, gs, asym, (N, K) in itertools.product((4, 8), (-1, 32, 128), (False, True), shapes):
        G = ref.group_geometry(gs, K)[1]
        qw = torch.randint(0, 256, (N, (K + 1) // 2 if bits == 4 else K), generator=gen, dtype=torch.uint8)
        if bits == 8 and not asym:
            qw = qw.view(torch.int8)
        z = torch.randint(0, 1 << bits, (N, G), generator=gen, dtype=torch.int32).to(torch.uint8) if asym else None
        sc = torch.rand(N, G, generator=gen) * 0.02 + 0.001
        w, sb = torch.ops.hfquant.repack(qw, sc, z, bits, gs, K)
        S = sc.double().repeat_interleave(ref.group_geometry(gs, K)[0], dim=1)[:, :K]
        for M in (5, 40, 64):
            for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
                x = torch.randn(M, K, generator=gen).to(dtype)
                b = torch.randn(N, generator=gen).to(dtype) if M % 2 else None
                y = torch.ops.hfquant.qlinear(x, w, sb, b, bits, gs, N, K).double()
                want = ref.qlinear_ref(x.double(), w, sb, None if b is None else b.double(), bits, gs, N, K)
                scale = max(want.abs().max().item(), (x.double().abs() @ S.t()).max().item())
                err = (y - want).abs().max().item()
                assert err <= tol * scale, (isa, bits, gs, asym, N, K, M, dtype, err / scale)
print("ok")
"""


@pytest.mark.parametrize("max_m,gemm", [(0, 0), (0, 1), (1000, 1)], ids=["all-blocked", "all-gemm", "all-gemv"])
def test_qlinear_forced_path(max_m, gemm):
    """HFQUANT_GEMV_MAX_M=0 sends every M past the GEMV kernels: with HFQUANT_QGEMM=0 to the
    blocked path (dequantize + ATen GEMM), else, for fp32/fp16 x on AVX-512, to the
    register-blocked Gemm kernel; HFQUANT_GEMV_MAX_M=1000 sends every M to the GEMV kernels."""
    env = dict(os.environ, HFQUANT_GEMV_MAX_M=str(max_m), HFQUANT_QGEMM=str(gemm), OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _FORCE_PATH_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("bits,group_size,asym", [(4, 128, False), (4, -1, True), (8, 32, True), (8, -1, False)],
                         ids=["w4-g128-sym", "w4-gch-asym", "w8-g32-asym", "w8-gch-sym"])
def test_opcheck(bits, group_size, asym):
    gen = torch.Generator().manual_seed(7)
    N, K = 17, 300
    qw, sc, z = make_quantized(N, K, bits, group_size, asym, gen)
    torch.library.opcheck(torch.ops.hfquant.repack.default, (qw, sc, z, bits, group_size, K))
    w, sb = torch.ops.hfquant.repack(qw, sc, z, bits, group_size, K)
    for x, bias in ((torch.randn(3, K, generator=gen), torch.randn(N, generator=gen)),
                    (torch.randn(2, 20, K, generator=gen).to(torch.bfloat16), None)):
        torch.library.opcheck(torch.ops.hfquant.qlinear.default, (x, w, sb, bias, bits, group_size, N, K))


# ------------------------------------------------------------------------------ errors


def _packed(bits=4, gs=32, N=8, K=64):
    gen = torch.Generator().manual_seed(8)
    qw, sc, z = make_quantized(N, K, bits, gs, False, gen)
    return torch.ops.hfquant.repack(qw, sc, z, bits, gs, K)


def test_repack_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(9)
    qw, sc, z = make_quantized(8, 64, 4, 32, True, gen)
    with pytest.raises(RuntimeError, match=r"hfquant::repack: bits=3 is not supported"):
        torch.ops.hfquant.repack(qw, sc, z, 3, 32, 64)
    with pytest.raises(RuntimeError, match=r"group_size=48 must be -1 .* multiple of 32"):
        torch.ops.hfquant.repack(qw, sc, z, 4, 48, 64)
    bad_z = z.clone()
    bad_z[3, 1] = 16
    with pytest.raises(RuntimeError, match=r"zero point 16 at index 7 is out of range for 4-bit \(0\.\.15\)"):
        torch.ops.hfquant.repack(qw, sc, bad_z, 4, 32, 64)
    with pytest.raises(RuntimeError, match=r"scales has shape \[8, 3\], expected \[8, 2\]"):
        torch.ops.hfquant.repack(qw, torch.rand(8, 3), z, 4, 32, 64)
    with pytest.raises(RuntimeError, match=r"4-bit qweight has 33 columns, expected ceil\(in_features/2\)=32"):
        torch.ops.hfquant.repack(torch.zeros(8, 33, dtype=torch.uint8), sc, z, 4, 32, 64)
    with pytest.raises(RuntimeError, match=r"4-bit qweight must be uint8, got Char"):
        torch.ops.hfquant.repack(qw.to(torch.int8), sc, z, 4, 32, 64)
    with pytest.raises(RuntimeError, match=r"symmetric qweight must be int8"):
        torch.ops.hfquant.repack(torch.zeros(8, 64, dtype=torch.uint8), sc, None, 8, 32, 64)


def test_qlinear_rejects_bad_arguments():
    w, sb = _packed()
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"hfquant::qlinear: bits=3 is not supported"):
        torch.ops.hfquant.qlinear(x, w, sb, None, 3, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"hfquant::qlinear: group_size=48"):
        torch.ops.hfquant.qlinear(x, w, sb, None, 4, 48, 8, 64)
    with pytest.raises(RuntimeError, match=r"x has last dimension 63, expected in_features=64"):
        torch.ops.hfquant.qlinear(torch.randn(2, 63), w, sb, None, 4, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"x must be float32, bfloat16 or float16, got Int"):
        torch.ops.hfquant.qlinear(torch.ones(2, 64, dtype=torch.int32), w, sb, None, 4, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"packed_weight has shape \[2, 2, 4, 16\], expected \[2, 3, 4, 16\]"):
        torch.ops.hfquant.qlinear(torch.randn(2, 96), w, sb, None, 4, 32, 8, 96)
    with pytest.raises(RuntimeError, match=r"packed_weight must be a contiguous uint8 CPU tensor"):
        torch.ops.hfquant.qlinear(x, w.to(torch.int8), sb, None, 4, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"packed_scales has shape \[2, 2, 2, 4\], expected \[2, 1, 2, 4\]"):
        torch.ops.hfquant.qlinear(x, w, sb, None, 4, -1, 8, 64)
    with pytest.raises(RuntimeError, match=r"packed_scales must be a contiguous float32 CPU tensor"):
        torch.ops.hfquant.qlinear(x, w, sb.double(), None, 4, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"bias has shape \[7\], expected \[8\]"):
        torch.ops.hfquant.qlinear(x, w, sb, torch.randn(7), 4, 32, 8, 64)


def test_set_cpu_isa_rejects_unknown_name():
    with pytest.raises(RuntimeError, match=r"unknown CPU kernel path 'avx9'"):
        _C.set_cpu_isa("avx9")


# ------------------------------------------------------------------ direct entry (eager)


def test_direct_entry_matches_dispatcher():
    """hfquant.ops.qlinear calls the CPU kernel directly (no dispatcher) for plain CPU
    tensors when no gradient is wanted: bit-identical results and the same errors as
    torch.ops.hfquant.qlinear; with a gradient wanted it takes the dispatcher (autograd)."""
    gen = torch.Generator().manual_seed(11)
    for bits, gs, asym in ((4, 128, False), (8, -1, True), (4, 32, True)):
        N, K = 37, 300
        qw, sc, z = make_quantized(N, K, bits, gs, asym, gen)
        w, sb = torch.ops.hfquant.repack(qw, sc, z, bits, gs, K)
        for M, dtype in ((1, torch.float32), (5, torch.bfloat16), (40, torch.float16), (128, torch.float32)):
            x = torch.randn(2, M, K, generator=gen).to(dtype)
            b = torch.randn(N, generator=gen).to(dtype)
            assert hfquant.ops._direct_ok(x, w, sb, b)
            with torch.no_grad():
                got = hfquant.ops.qlinear(x, w, sb, b, bits, gs, N, K)
            want = torch.ops.hfquant.qlinear(x, w, sb, b, bits, gs, N, K)
            assert got.dtype == dtype and got.shape == (2, M, N)
            assert torch.equal(got, want), (bits, gs, asym, M, dtype)
    with pytest.raises(RuntimeError, match=r"x has last dimension 33, expected in_features=300"):
        hfquant.ops.qlinear(torch.randn(3, 33), w, sb, None, bits, gs, N, K)
    with pytest.raises(RuntimeError, match=r"x must be float32, bfloat16 or float16, got Long"):
        hfquant.ops.qlinear(torch.ones(3, K, dtype=torch.long), w, sb, None, bits, gs, N, K)
    xg = torch.randn(3, K, requires_grad=True)
    assert not hfquant.ops._direct_ok(xg, w, sb, None)
    y = hfquant.ops.qlinear(xg, w, sb, None, bits, gs, N, K)
    assert y.grad_fn is not None
    y.sum().backward()
    assert xg.grad is not None and xg.grad.shape == xg.shape
