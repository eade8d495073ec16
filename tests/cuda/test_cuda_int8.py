"""The int8-activation ops on CUDA against their pure-torch twins in hfquant/ref.py.

Packing, codes, outlier columns and int32 products must match bitwise; the scaled float
outputs follow the tolerance policy of tests/_utils.py. The GEMM tests run on both int8 GEMM
engines: cuBLASLt called with its heuristic algorithm and a workspace, and at::_int_mm
(_C.set_cuda_int8_lt). Skipped without a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

import hfquant.ops  # noqa: F401  (registers the fake kernels)
from _utils import assert_close
from cuda_util import CUDA_OK, equal_nan, requires_cuda
from hfquant import ref
from hfquant._ext import _C

pytestmark = requires_cuda

OPS = torch.ops.hfquant
DEV = "cuda"
# M = 1 (decode; padded to cuBLASLt's minimum rows), odd M/N/K, K = 1, M past 256
SHAPES = [(1, 1, 1), (1, 33, 576), (3, 17, 5), (5, 100, 259), (17, 70, 64), (64, 129, 300), (300, 257, 1000)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["cublaslt", "int_mm"])
def engine(request):
    """The int8 GEMM engine of the CUDA ops, restored after the test."""
    if not CUDA_OK:
        pytest.skip("no CUDA")
    prev = _C.cuda_int8_lt()
    _C.set_cuda_int8_lt(request.param == "cublaslt")
    yield request.param
    _C.set_cuda_int8_lt(prev)


def _packed(N, K, gen, lo=-127):
    w = torch.randint(lo, 128, (N, K), generator=gen, dtype=torch.int8)
    pw, cs = OPS.int8_pack(w.to(DEV))
    return w, pw, cs


@pytest.mark.parametrize("N,K", [(1, 1), (16, 4), (17, 5), (100, 259), (129, 576)])
def test_int8_pack_matches_ref_and_inverts(N, K):
    gen = torch.Generator().manual_seed(N * 1000 + K)
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    pw, cs = OPS.int8_pack(w.to(DEV))
    rw, rcs = ref.int8_pack_cuda_ref(w)
    assert pw.device.type == "cuda" and torch.equal(pw.cpu(), rw) and torch.equal(cs.cpu(), rcs)
    assert torch.equal(ref.int8_weight_from_packed(pw, N, K).cpu(), w)
    # the ref twin gives the CUDA layout for CUDA tensors
    assert torch.equal(ref.int8_pack_ref(w.to(DEV))[0].cpu(), rw)


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_mm_is_exact(engine, M, N, K):
    gen = torch.Generator().manual_seed(M * 7 + N * 13 + K)
    w, pw, cs = _packed(N, K, gen, lo=-128)
    xq = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    y = OPS.int8_mm(xq.to(DEV), pw, cs, N)
    cpw, ccs = ref.int8_pack_ref(w)
    assert y.dtype == torch.int32 and torch.equal(y.cpu(), ref.int8_mm_ref(xq, cpw, ccs, N))


def test_int8_mm_extreme_values_exact(engine):
    K, N = 1000, 20
    for wv, xv in [(127, 127), (-128, 127), (-128, -127), (127, -127)]:
        pw, cs = OPS.int8_pack(torch.full((N, K), wv, dtype=torch.int8, device=DEV))
        y = OPS.int8_mm(torch.full((3, K), xv, dtype=torch.int8, device=DEV), pw, cs, N)
        assert (y == wv * xv * K).all(), (wv, xv)


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_int8_gemm_matches_ref(engine, M, N, K, out_dtype):
    gen = torch.Generator().manual_seed(M + N + K)
    w, pw, cs = _packed(N, K, gen)
    cpw, ccs = ref.int8_pack_ref(w)
    xq = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    xs = torch.rand(M, generator=gen) * 0.05
    ws = torch.rand(N, generator=gen) * 0.01
    bias = torch.randn(N, generator=gen)
    for b in (None, bias):
        y = OPS.int8_gemm(xq.to(DEV), xs.to(DEV), pw, cs, ws.to(DEV), None if b is None else b.to(DEV), out_dtype, N)
        assert y.dtype == out_dtype and y.shape == (M, N)
        # the epilogue rounds like the reference's fp32 steps: float32 output is bit exact
        want32 = ref.int8_gemm_ref(xq, xs, cpw, ccs, ws, b, torch.float32, N)
        if out_dtype == torch.float32:
            assert torch.equal(y.cpu(), want32)
        assert_close(y.cpu(), ref.int8_gemm_ref(xq, xs, cpw, ccs, ws, b, torch.float64, N), out_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 2.5, math.inf])
def test_quantize_act_matches_ref_bitwise(dtype, threshold):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 7, 300, generator=gen) * 0.5).to(dtype)
    x[1, 2, 17] = 40.0
    for act_scale in (None, torch.rand(300, generator=gen) + 0.5):
        q, s, cols = OPS.quantize_act(x.to(DEV), threshold, None if act_scale is None else act_scale.to(DEV))
        rq, rs, rcols = ref.quantize_act_ref(x, threshold, act_scale)
        assert q.device.type == "cuda" and q.shape == x.shape and s.shape == x.shape[:-1]
        assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and torch.equal(cols.cpu(), rcols)
        if threshold == 2.5:
            assert 17 in cols.tolist()
        else:
            assert cols.numel() == 0


def test_quantize_act_edge_rows():
    x = torch.randn(6, 64)
    x[0] = 0.0
    x[1] = 1e-39
    x[2, 5] = float("nan")
    x[3, 9] = float("inf")
    x[4] = 100.0
    for thr in (0.0, 6.0, math.inf):
        q, s, cols = OPS.quantize_act(x.to(DEV), thr)
        rq, rs, rcols = ref.quantize_act_ref(x, thr)
        assert torch.equal(q.cpu(), rq) and equal_nan(s, rs) and torch.equal(cols.cpu(), rcols), thr
    # w8a8: a row holding NaN/Inf gets scale NaN; llm_int8 at 6: every column is an outlier
    _, s, _ = OPS.quantize_act(x.to(DEV), 0.0)
    assert s[2].isnan() and s[3].isnan() and s[0] == 0 and s[1] == 0
    assert OPS.quantize_act(x.to(DEV), 6.0)[2].numel() == 64


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_linear_matches_ref(engine, M, N, K, dtype, threshold):
    gen = torch.Generator().manual_seed(M * 3 + N + K)
    w, pw, cs = _packed(N, K, gen)
    cpw, ccs = ref.int8_pack_ref(w)
    ws = torch.rand(N, generator=gen) * 0.01
    bias = torch.randn(N, generator=gen)
    x = (torch.randn(M, K, generator=gen) * 2).to(dtype)
    if K > 3:
        x[0, 3] = 30.0
    for b, act in [(None, None), (bias, torch.rand(K, generator=gen) + 0.5)]:
        y = OPS.int8_linear(x.to(DEV), pw, cs, ws.to(DEV), None if b is None else b.to(DEV),
                            None if act is None else act.to(DEV), threshold, N)
        assert y.dtype == dtype and y.shape == (M, N) and y.device.type == "cuda"
        expect = ref.int8_linear_ref(x, cpw, ccs, ws, b, act, threshold, N)
        assert_close(y.cpu(), expect, dtype,
                     scale=float((x.float().abs() @ (w.float().abs() * ws[:, None]).t()).max()))


def test_int8_linear_batched_strided_nonfinite():
    gen = torch.Generator().manual_seed(5)
    N, K = 40, 96
    _, pw, cs = _packed(N, K, gen)
    ws = (torch.rand(N, generator=gen) * 0.01).to(DEV)
    x = torch.randn(2, 3, 2 * K, generator=gen, device="cpu").to(DEV)[..., ::2]
    y = OPS.int8_linear(x, pw, cs, ws, None, None, 6.0, N)
    assert y.shape == (2, 3, N)
    assert torch.equal(y, OPS.int8_linear(x.contiguous(), pw, cs, ws, None, None, 6.0, N))
    assert OPS.int8_linear(x[:0], pw, cs, ws, None, None, 0.0, N).shape == (0, 3, N)
    xn = torch.randn(3, K, generator=gen).to(DEV)
    xn[1, 4] = float("nan")
    for thr in (0.0, 6.0):
        yn = OPS.int8_linear(xn, pw, cs, ws, None, None, thr, N)
        assert yn[1].isnan().all() and torch.isfinite(yn[[0, 2]]).all()


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_opcheck(threshold):
    gen = torch.Generator().manual_seed(0)
    N, K = 24, 40
    w, pw, cs = _packed(N, K, gen)
    x = torch.randn(3, K, generator=gen).to(DEV)
    x[0, 1] = 50.0
    ws = (torch.rand(N, generator=gen) * 0.01).to(DEV)
    xq = torch.randint(-127, 128, (3, K), generator=gen, dtype=torch.int8).to(DEV)
    torch.library.opcheck(OPS.int8_pack.default, (w.to(DEV),))
    torch.library.opcheck(OPS.quantize_act.default, (x, threshold, None))
    torch.library.opcheck(OPS.int8_mm.default, (xq, pw, cs, N))
    torch.library.opcheck(OPS.int8_gemm.default, (xq, torch.rand(3, device=DEV), pw, cs, ws, None, torch.bfloat16, N))
    torch.library.opcheck(OPS.int8_linear.default, (x, pw, cs, ws, torch.randn(N, device=DEV), None, threshold, N))


def test_bad_arguments_are_named():
    gen = torch.Generator().manual_seed(0)
    N, K = 20, 36
    w, pw, cs = _packed(N, K, gen)
    ws = torch.rand(N, device=DEV)
    x = torch.randn(2, K, device=DEV)
    xq = torch.randint(-127, 128, (2, K), dtype=torch.int8, device=DEV)
    cases = [
        (lambda: OPS.int8_linear(x, pw, cs, ws.cpu(), None, None, 0.0, N), "w_scales is on cpu"),
        (lambda: OPS.int8_linear(x, pw, cs.cpu(), ws, None, None, 0.0, N), "colsum is on cpu"),
        (lambda: OPS.int8_mm(xq, pw, cs, N + 16), "rows, expected"),
        (lambda: OPS.int8_mm(xq[:, :-16], pw, cs, N), "xq has 20 columns"),
        (lambda: OPS.int8_mm(torch.full((1, K), -128, dtype=torch.int8, device=DEV), pw, cs, N), "-128"),
        (lambda: OPS.int8_gemm(xq, torch.ones(3, device=DEV), pw, cs, ws, None, torch.float32, N), "x_scales has shape"),
        (lambda: OPS.int8_linear(x, pw, cs, ws, None, None, -0.5, N), "threshold"),
        (lambda: OPS.quantize_act(x, 0.0, torch.ones(K)), "act_scale is on cpu"),
        (lambda: OPS.int8_pack(w.to(DEV).to(torch.int32)), "qweight must be int8"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            fn()
