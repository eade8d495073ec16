"""The int8-activation ops (int8_pack, quantize_act, int8_mm, int8_gemm, int8_linear) against
their pure-torch twins in hfquant/ref.py, on every device (`device`: the CPU, and CUDA where
present) and on each device's kernel paths (`i8path`: every int8 GEMM kernel this CPU can run;
on CUDA the two int8 GEMM engines, cuBLASLt and at::_int_mm).

Integer results (packing in each device's layout, codes, int32 products) must match bitwise;
the scaled float outputs follow the tolerance policy of _utils.
"""
from __future__ import annotations

import math

import pytest
import torch

import hfquant.ops  # noqa: F401  (registers the fake kernels)
from _utils import assert_close
from hfquant import ref
from hfquant._ext import _C

OPS = torch.ops.hfquant
# (M, N, K): M = 1 (decode; on CUDA padded to cuBLASLt's minimum rows), remainders of the 8-
# and 4-row blocks, tile tails (N % 16), K not a multiple of 4, K = 1, sizes past one tile
# group, and M past 256.
SHAPES = [(1, 1, 1), (1, 33, 576), (3, 17, 5), (5, 100, 259), (9, 48, 130), (17, 70, 64), (64, 129, 300),
          (300, 257, 1000)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weights(N, K, gen, lo=-127):
    return torch.randint(lo, 128, (N, K), generator=gen, dtype=torch.int8)


def _packed(N, K, gen, lo=-127, device="cpu"):
    """Random int8 weights (on the CPU) and their packing by the op on `device`."""
    w = _weights(N, K, gen, lo)
    return (w, *OPS.int8_pack(w.to(device)))


def _to(device, *ts):
    return [None if t is None else t.to(device) for t in ts]


# the twin of int8_pack for each device's layout
PACK_REF = {"cpu": ref.int8_pack_ref, "cuda": ref.int8_pack_cuda_ref}


@pytest.mark.parametrize("N,K", [(1, 1), (16, 4), (17, 5), (100, 259), (129, 576)])
def test_int8_pack_matches_ref_and_inverts(device, N, K):
    gen = torch.Generator().manual_seed(N * 1000 + K)
    w = _weights(N, K, gen, lo=-128)
    pw, cs = OPS.int8_pack(w.to(device))
    rw, rcs = PACK_REF[device](w)
    assert pw.device.type == device and torch.equal(pw.cpu(), rw) and torch.equal(cs.cpu(), rcs)
    assert torch.equal(ref.int8_weight_from_packed(pw, N, K).cpu(), w)
    # the twin gives the device's layout for the device's tensors
    assert torch.equal(ref.int8_pack_ref(w.to(device))[0].cpu(), rw)


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_mm_is_exact(device, i8path, M, N, K):
    gen = torch.Generator().manual_seed(M * 7 + N * 13 + K)
    w, pw, cs = _packed(N, K, gen, lo=-128, device=device)  # -128 weights are allowed
    xq = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    y = OPS.int8_mm(xq.to(device), pw, cs, N)
    cpw, ccs = ref.int8_pack_ref(w)  # the twin computes on the CPU layout
    assert y.dtype == torch.int32 and torch.equal(y.cpu(), ref.int8_mm_ref(xq, cpw, ccs, N))


def test_int8_mm_extreme_values_exact(device, i8path):
    """All-max products: 127 * 127 * K and 127 * -128 * K are exact (no int16 saturation)."""
    K, N = 1000, 20
    for wv, xv in [(127, 127), (-128, 127), (-128, -127), (127, -127)]:
        w = torch.full((N, K), wv, dtype=torch.int8, device=device)
        pw, cs = OPS.int8_pack(w)
        xq = torch.full((3, K), xv, dtype=torch.int8, device=device)
        y = OPS.int8_mm(xq, pw, cs, N)
        assert (y == wv * xv * K).all(), (wv, xv)
    # alternating signs in one 4-byte lane
    w = torch.tensor([[127, -128, 127, -128] * 8], dtype=torch.int8, device=device)
    pw, cs = OPS.int8_pack(w)
    xq = torch.tensor([[127, -127, 127, -127] * 8], dtype=torch.int8, device=device)
    assert OPS.int8_mm(xq, pw, cs, 1).item() == 8 * 2 * (127 * 127 + 128 * 127)


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_int8_gemm_matches_ref(device, i8path, M, N, K, out_dtype):
    gen = torch.Generator().manual_seed(M + N + K)
    w, pw, cs = _packed(N, K, gen, device=device)
    cpw, ccs = ref.int8_pack_ref(w)
    xq = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    xs = torch.rand(M, generator=gen) * 0.05
    ws = torch.rand(N, generator=gen) * 0.01
    bias = torch.randn(N, generator=gen)
    for b in (None, bias):
        y = OPS.int8_gemm(*_to(device, xq, xs), pw, cs, *_to(device, ws, b), out_dtype, N)
        assert y.device.type == device and y.dtype == out_dtype and y.shape == (M, N)
        if device == "cuda" and out_dtype == torch.float32:
            # the CUDA epilogue rounds like the twin's fp32 steps: float32 output is bit exact
            assert torch.equal(y.cpu(), ref.int8_gemm_ref(xq, xs, cpw, ccs, ws, b, torch.float32, N))
        expect = ref.int8_gemm_ref(xq, xs, cpw, ccs, ws, b, torch.float64, N)
        assert_close(y.cpu(), expect, out_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 2.5, math.inf])
def test_quantize_act_matches_ref(device, i8path, dtype, threshold):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 7, 300, generator=gen) * 0.5).to(dtype)
    x[1, 2, 17] = 40.0  # an outlier column
    for act_scale in (None, torch.rand(300, generator=gen) + 0.5):
        q, s, cols = OPS.quantize_act(*_to(device, x), threshold, *_to(device, act_scale))
        rq, rs, rcols = ref.quantize_act_ref(x, threshold, act_scale)
        assert q.device.type == device and q.dtype == torch.int8 and q.shape == x.shape and s.shape == x.shape[:-1]
        q, s, cols = q.cpu(), s.cpu(), cols.cpu()
        assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(cols, rcols)
        if threshold == 2.5:
            assert 17 in cols.tolist() and (q[..., cols] == 0).all()
        else:
            assert cols.numel() == 0
        assert q.abs().max() == 127  # each row's absmax maps to +-127


def test_quantize_act_edge_rows(device, i8path):
    """All-zero rows, rows that are all outliers, tiny rows and non-finite values."""
    x = torch.randn(6, 64)
    x[0] = 0.0  # all zero -> scale 0, codes 0
    x[1] = 1e-39  # denormal: 127 / absmax overflows -> treated as zero
    x[2, 5] = float("nan")
    x[3, 9] = float("inf")
    x[4] = 100.0  # every column of this row is an outlier at threshold 6
    for thr in (0.0, 6.0, math.inf):
        q, s, cols = (t.cpu() for t in OPS.quantize_act(x.to(device), thr))
        rq, rs, rcols = ref.quantize_act_ref(x, thr)
        assert torch.equal(q, rq) and torch.equal(cols, rcols), thr
        assert torch.equal(s.isnan(), rs.isnan()) and torch.equal(s.nan_to_num(), rs.nan_to_num()), thr
    # w8a8 (no outliers): a row holding NaN/Inf gets scale NaN (its output becomes NaN)
    q, s, cols = (t.cpu() for t in OPS.quantize_act(x.to(device), 0.0))
    rq, rs, _ = ref.quantize_act_ref(x, 0.0)
    assert torch.equal(q, rq)
    assert s[0] == 0 and s[1] == 0 and (q[:2] == 0).all()
    assert s[2].isnan() and s[3].isnan() and (q[2:4] == 0).all()
    assert torch.equal(s.isnan(), rs.isnan()) and torch.equal(s.nan_to_num(), rs.nan_to_num())
    # llm_int8: NaN/Inf and the all-outlier row are outlier columns; all of them here
    q, s, cols = (t.cpu() for t in OPS.quantize_act(x.to(device), 6.0))
    rq, rs, rcols = ref.quantize_act_ref(x, 6.0)
    assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(cols, rcols)
    assert cols.numel() == 64 and (q == 0).all() and (s == 0).all()


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_linear_matches_ref(device, i8path, M, N, K, dtype, threshold):
    gen = torch.Generator().manual_seed(M * 3 + N + K)
    w, pw, cs = _packed(N, K, gen, device=device)
    cpw, ccs = ref.int8_pack_ref(w)
    ws = torch.rand(N, generator=gen) * 0.01
    bias = torch.randn(N, generator=gen)
    x = (torch.randn(M, K, generator=gen) * 2).to(dtype)
    if K > 3:
        x[0, 3] = 30.0  # an outlier column for threshold 6
    for b, act in [(None, None), (bias, torch.rand(K, generator=gen) + 0.5)]:
        y = OPS.int8_linear(*_to(device, x), pw, cs, *_to(device, ws, b, act), threshold, N)
        assert y.device.type == device and y.dtype == dtype and y.shape == (M, N)
        expect = ref.int8_linear_ref(x, cpw, ccs, ws, b, act, threshold, N)
        assert_close(y.cpu(), expect, dtype,
                     scale=float((x.float().abs() @ (w.float().abs() * ws[:, None]).t()).max()))


def test_int8_linear_batched_and_strided(device, i8path):
    gen = torch.Generator().manual_seed(5)
    N, K = 40, 96
    _, pw, cs = _packed(N, K, gen, device=device)
    ws = (torch.rand(N, generator=gen) * 0.01).to(device)
    base = torch.randn(2, 3, 2 * K, generator=gen).to(device)
    x = base[..., ::2]  # non-contiguous last dimension
    y = OPS.int8_linear(x, pw, cs, ws, None, None, 6.0, N)
    assert y.shape == (2, 3, N)
    assert torch.equal(y, OPS.int8_linear(x.contiguous(), pw, cs, ws, None, None, 6.0, N))
    assert OPS.int8_linear(x[:0], pw, cs, ws, None, None, 0.0, N).shape == (0, 3, N)
    # a NaN makes its row NaN, and only its row
    xn = torch.randn(3, K, generator=gen).to(device)
    xn[1, 4] = float("nan")
    for thr in (0.0, 6.0):
        yn = OPS.int8_linear(xn, pw, cs, ws, None, None, thr, N)
        assert yn[1].isnan().all() and torch.isfinite(yn[[0, 2]]).all()


def test_int8_linear_outliers_exact_in_float(i8path):
    """An outlier column goes through fp32 unquantized: a huge value there does not spoil
    the rest of the row, unlike w8a8."""
    gen = torch.Generator().manual_seed(9)
    N, K = 32, 128
    wf = torch.randn(N, K, generator=gen)
    ws = wf.abs().amax(1) / 127
    w = torch.round(wf / ws[:, None]).to(torch.int8)
    pw, cs = OPS.int8_pack(w)
    x = torch.randn(4, K, generator=gen)
    x[:, 7] = 3000.0
    exact = x.double() @ (w.double() * ws.double()[:, None]).t()
    err_llm = (OPS.int8_linear(x, pw, cs, ws, None, None, 6.0, N).double() - exact).abs().max()
    err_w8a8 = (OPS.int8_linear(x, pw, cs, ws, None, None, 0.0, N).double() - exact).abs().max()
    assert err_llm < 0.05 * err_w8a8


def test_int8_linear_nonfinite_input(i8path):
    gen = torch.Generator().manual_seed(2)
    _, pw, cs = _packed(16, 32, gen)
    ws = torch.rand(16, generator=gen) * 0.01
    x = torch.randn(3, 32, generator=gen)
    x[1, 4] = float("nan")
    for thr in (0.0, 6.0):
        y = OPS.int8_linear(x, pw, cs, ws, None, None, thr, 16)
        assert y[1].isnan().all() and torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_opcheck(device, threshold):
    gen = torch.Generator().manual_seed(0)
    N, K = 24, 40
    w, pw, cs = _packed(N, K, gen, device=device)
    x = torch.randn(3, K, generator=gen)
    x[0, 1] = 50.0
    x = x.to(device)
    ws = (torch.rand(N, generator=gen) * 0.01).to(device)
    xq = torch.randint(-127, 128, (3, K), generator=gen, dtype=torch.int8).to(device)
    torch.library.opcheck(OPS.int8_pack.default, (w.to(device),))
    torch.library.opcheck(OPS.quantize_act.default, (x, threshold, None))
    torch.library.opcheck(OPS.int8_mm.default, (xq, pw, cs, N))
    torch.library.opcheck(OPS.int8_gemm.default,
                          (xq, torch.rand(3, device=device), pw, cs, ws, None, torch.bfloat16, N))
    torch.library.opcheck(OPS.int8_linear.default,
                          (x, pw, cs, ws, torch.randn(N, device=device), None, threshold, N))


def test_ops_reject_bad_arguments(device):
    gen = torch.Generator().manual_seed(0)
    N, K = 20, 36
    w, pw, cs = _packed(N, K, gen, device=device)
    w = w.to(device)
    ws = torch.rand(N, device=device)
    x = torch.randn(2, K, device=device)
    xq = torch.randint(-127, 128, (2, K), dtype=torch.int8, device=device)
    cases = [  # on every device
        (lambda: OPS.int8_pack(w.to(torch.int32)), "qweight must be int8"),
        (lambda: OPS.int8_mm(torch.full((1, K), -128, dtype=torch.int8, device=device), pw, cs, N), "-128"),
        (lambda: OPS.int8_gemm(xq, torch.ones(3, device=device), pw, cs, ws, None, torch.float32, N),
         "x_scales has shape"),
        (lambda: OPS.int8_linear(x, pw, cs, ws, None, None, -0.5, N), "threshold"),
    ]
    if device == "cuda":  # the CUDA layout's sizes, and tensors left on the CPU
        cases += [
            (lambda: OPS.int8_linear(x, pw, cs, ws.cpu(), None, None, 0.0, N), "w_scales is on cpu"),
            (lambda: OPS.int8_linear(x, pw, cs.cpu(), ws, None, None, 0.0, N), "colsum is on cpu"),
            (lambda: OPS.int8_mm(xq, pw, cs, N + 16), "rows, expected"),
            (lambda: OPS.int8_mm(xq[:, :-16], pw, cs, N), "xq has 20 columns"),
            (lambda: OPS.quantize_act(x, 0.0, torch.ones(K)), "act_scale is on cpu"),
        ]
    else:
        cases += [
            (lambda: OPS.int8_pack(w[0]), "2-D"),
            (lambda: OPS.quantize_act(x.to(torch.int32), 0.0, None), "x must be float32"),
            (lambda: OPS.quantize_act(x, -1.0, None), "threshold=-1"),
            (lambda: OPS.quantize_act(x, float("nan"), None), "threshold=nan"),
            (lambda: OPS.quantize_act(x, 0.0, torch.ones(K + 1)), "act_scale has shape"),
            (lambda: OPS.int8_mm(xq, pw, cs, N + 16), "tiles"),
            (lambda: OPS.int8_mm(xq, pw, cs[:-1], N), "colsum"),
            (lambda: OPS.int8_mm(xq[:, :-4], pw, cs, N), "xq has 32 columns"),
            (lambda: OPS.int8_mm(xq.float(), pw, cs, N), "xq must be int8"),
            (lambda: OPS.int8_mm(xq, pw.to(torch.uint8), cs, N), "packed_weight must be"),
            (lambda: OPS.int8_gemm(xq, torch.ones(2), pw, cs, ws, None, torch.int32, N), "out_dtype"),
            (lambda: OPS.int8_linear(x, pw, cs, ws[:-1], None, None, 0.0, N), "w_scales has shape"),
            (lambda: OPS.int8_linear(x, pw, cs, ws, torch.ones(N + 1), None, 0.0, N), "bias has shape"),
            (lambda: OPS.int8_linear(x[:, :8], pw, cs, ws, None, None, 0.0, N), "last dimension 8"),
            (lambda: OPS.int8_linear(x, pw, cs, ws, None, None, 0.0, 0), "out_features=0"),
        ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            fn()


def test_int8_path_follows_isa_unless_forced():
    prev = _C.cpu_isa()
    feats = _C.cpu_features()
    try:
        for isa in _C.available_isas():
            _C.set_cpu_isa(isa)
            path = _C.int8_path()
            if isa == "portable":
                assert path == "portable"
            elif isa.startswith("avx512") and feats["avx512_vnni"]:
                assert path == "avx512vnni"
            else:
                assert path == ("avxvnni" if feats["avx_vnni"] else "avx2")
            _C.set_int8_path("portable")
            assert _C.int8_path() == "portable"
            _C.set_int8_path("auto")
            assert _C.int8_path() == path
    finally:
        _C.set_cpu_isa(prev)
        _C.set_int8_path("auto")
    with pytest.raises(RuntimeError, match="unknown int8 path 'sse9'"):
        _C.set_int8_path("sse9")
    assert "portable" in _C.available_int8_paths()
