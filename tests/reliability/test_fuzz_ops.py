"""Property tests of every native op against its twin in hfquant/ref.py, on random inputs
drawn by hypothesis: shapes including 0 and 1 and odd sizes, every dtype, non-contiguous
and offset views, extreme magnitudes, NaN and Inf, and every CPU kernel path.

Properties: integer results (packings, codes, int32 products, KV stores) equal the twin's
bit for bit (NaN where the twin has NaN); float outputs are finite exactly where the
twin's (rounded to the output dtype) are, and within the tolerance policy of _utils there;
arguments a kernel refuses (empty layers, out-of-range zero points or activations, NaN
codebooks) raise a RuntimeError naming the op, never crash.

HFQUANT_FUZZ picks the budget: "quick" (default, the regular suite: a few seconds per op)
or "nightly" (`make fuzz`: 10,000 cases per op); HFQUANT_FUZZ_EXAMPLES=<n> sets the cases
per test directly. HFQUANT_FUZZ_REPORT=<file> writes the number of cases run per op as JSON.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import hfquant.ops  # noqa: F401  (registers the fake kernels)
from _utils import TOLERANCE
from hfquant import ref
from hfquant._ext import _C

OPS = torch.ops.hfquant
_HC = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("quick", max_examples=60, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_HC, print_blob=True)
settings.register_profile("nightly", max_examples=10_000, deadline=None, database=None, suppress_health_check=_HC,
                          print_blob=True)
PROFILE = os.environ.get("HFQUANT_FUZZ", "quick")
FUZZ = settings.get_profile(PROFILE)
if os.environ.get("HFQUANT_FUZZ_EXAMPLES"):  # an explicit budget (cases per test)
    FUZZ = settings(FUZZ, max_examples=int(os.environ["HFQUANT_FUZZ_EXAMPLES"]))

ISAS = _C.available_isas()
I8_PATHS = _C.available_int8_paths()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("HFQUANT_FUZZ_REPORT")
    if path:
        old = json.load(open(path)) if os.path.exists(path) else {}
        old.update({"profile": PROFILE, **{k: v for k, v in CASES.items()}})
        with open(path, "w") as fh:
            json.dump(old, fh, indent=1, sort_keys=True)


# --- drawing inputs ---------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)
# value kinds of float inputs: typical, tiny, large (results stay inside float32), all zero,
# one constant, and typical with NaN/Inf sprinkled in
KINDS = ["normal", "tiny", "large", "zeros", "constant", "nonfinite"]
kinds = st.sampled_from(KINDS)
layouts = st.sampled_from(["contiguous", "strided", "offset", "transposed"])


def floats(shape, dtype, kind, gen, large=1e12):
    x = torch.randn(shape, generator=gen)
    if kind == "tiny":
        x = x * 1e-6
    elif kind == "large":
        x = x * (large if dtype != torch.float16 else 1e3)
    elif kind == "zeros":
        x = torch.zeros(shape)
    elif kind == "constant":
        x = torch.full(shape, float(torch.randn(1, generator=gen)) * 3)
    elif kind == "nonfinite" and x.numel():
        flat = x.view(-1)
        n = int(torch.randint(1, 4, (1,), generator=gen))
        pos = torch.randint(0, flat.numel(), (n,), generator=gen)
        vals = torch.tensor([float("nan"), float("inf"), -float("inf")])
        flat[pos] = vals[torch.randint(0, 3, (n,), generator=gen)]
    return x.to(dtype)


def view_as(x: torch.Tensor, layout: str, gen) -> torch.Tensor:
    """The same values as x, laid out as asked: a column-strided view, a view at an offset
    inside a larger buffer, or the transpose of a contiguous [K, rows] tensor."""
    if x.dim() == 0 or x.numel() == 0 or layout == "contiguous":
        return x
    if layout == "strided":
        big = torch.empty((*x.shape[:-1], x.shape[-1] * 2), dtype=x.dtype).normal_(generator=gen)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "offset":
        off = int(torch.randint(1, 9, (1,), generator=gen))
        buf = torch.empty(x.numel() + off, dtype=x.dtype).normal_(generator=gen)
        v = buf[off:].view(x.shape)
        v.copy_(x)
        return v
    t = x.reshape(-1, x.shape[-1]).t().contiguous().t()  # column-major rows
    return t.reshape(x.shape) if x.dim() == 2 else t.view(x.shape) if t.is_contiguous() else x


def _with_isa(isa, fn):
    prev = _C.cpu_isa()
    _C.set_cpu_isa(isa)
    try:
        return fn()
    finally:
        _C.set_cpu_isa(prev)


def _with_i8(path, fn):
    _C.set_int8_path(path)
    try:
        return fn()
    finally:
        _C.set_int8_path("auto")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN equal to NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 0.0, msg: str = ""):
    """Finite where the float64 twin rounded to ``dtype`` is finite, and within
    TOLERANCE[dtype] * max(max |expected|, scale) there (the policy of _utils), plus the
    spacing of ``dtype``'s subnormals (an output below float16's normal range, 6e-5, is
    rounded to a multiple of 6e-8 whatever the kernel computed)."""
    assert actual.shape == expected.shape, msg
    e = expected.double()
    finite = torch.isfinite(e.to(dtype).double())
    a = actual.double()
    assert torch.equal(torch.isfinite(a), finite), f"{msg}: finite/non-finite pattern differs from the twin's"
    if finite.any():
        s = max(e[finite].abs().max().item(), scale)
        err = (a[finite] - e[finite]).abs().max().item()
        fi = torch.finfo(dtype)
        assert err <= TOLERANCE[dtype] * s + fi.tiny * fi.eps, \
            f"{msg}: max |error| {err:.3e} > {TOLERANCE[dtype]} x {s:.3e}"


def raises_clean(fn, op: str):
    with pytest.raises(RuntimeError, match=f"hfquant::{op}"):
        fn()


# --- weight-only int4/int8: repack, qlinear -------------------------------------------------------
GROUP_SIZES = [-1, 32, 64, 128, 256]


@st.composite
def quantized(draw, max_n=40, max_k=300):
    bits = draw(st.sampled_from([4, 8]))
    gs = draw(st.sampled_from(GROUP_SIZES))
    N = draw(st.integers(1, max_n))
    K = draw(st.one_of(st.integers(1, 40), st.integers(1, max_k)))
    asym = draw(st.booleans())
    sdtype = draw(dtypes)
    skind = draw(st.sampled_from(["normal", "zeros", "tiny", "large", "nonfinite"]))
    gen = _gen(draw(seeds))
    _, G = ref.group_geometry(gs, K)
    v = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.int32)
    if bits == 4:
        vp = torch.nn.functional.pad(v, (0, K % 2))
        qw = (vp[:, 0::2] | (vp[:, 1::2] << 4)).to(torch.uint8)
    else:
        qw = v.to(torch.uint8) if asym else (v - 128).to(torch.int8)
    s = floats((N, G), torch.float32, skind, gen, large=1e6).abs()
    if skind == "normal":
        s = s * 0.02 + 1e-3
    z = torch.randint(0, 1 << bits, (N, G), generator=gen, dtype=torch.int32).to(torch.uint8) if asym else None
    return bits, gs, N, K, qw, s.to(sdtype), z


@FUZZ
@given(q=quantized(), bad_zero=st.integers(0, 9))
def test_fuzz_repack(q, bad_zero):
    bits, gs, N, K, qw, s, z = q
    CASES["repack"] += 1
    if z is not None and bits == 4 and bad_zero == 0:
        z = z.clone()
        z[-1, -1] = 16 + bad_zero * 10  # outside 0..15: refused, never read past the table
        raises_clean(lambda: OPS.repack(qw, s, z, bits, gs, K), "repack")
        return
    got = OPS.repack(qw, s, z, bits, gs, K)
    want = ref.repack_ref(qw, s, z, bits, gs, K)
    assert same(got[0], want[0]) and same(got[1], want[1])


@FUZZ
@given(shape=st.sampled_from([(0, 5), (3, 0)]), bits=st.sampled_from([4, 8]))
def test_fuzz_repack_empty_refused(shape, bits):
    CASES["repack"] += 1
    N, K = shape
    qw = torch.zeros(N, (K + 1) // 2 if bits == 4 else K, dtype=torch.uint8 if bits == 4 else torch.int8)
    raises_clean(lambda: OPS.repack(qw, torch.ones(N, 1), None, bits, -1, K), "repack")


def _lead(draw):
    return tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 17]), min_size=0, max_size=2)))


def _linear_inputs(data, N: int, K: int):
    """Activations [*lead, K] (dtype, value kind, memory layout drawn), a kernel path and an
    optional bias [N] for a weight-only linear op."""
    dtype, kind, layout = data.draw(dtypes), data.draw(kinds), data.draw(layouts)
    lead = _lead(data.draw) or (data.draw(st.integers(0, 20)),)
    isa = data.draw(st.sampled_from(ISAS))
    gen = _gen(data.draw(seeds))
    x = view_as(floats((*lead, K), dtype, kind, gen, large=1e15), layout, gen)
    bias = floats((N,), data.draw(dtypes), "normal", gen) if data.draw(st.booleans()) else None
    return dtype, kind, layout, lead, isa, gen, x, bias


@FUZZ
@given(q=quantized(), data=st.data())
def test_fuzz_qlinear(q, data):
    bits, gs, N, K, qw, s, z = q
    assume(torch.isfinite(s.float()).all())  # non-finite scales: repack above, and the loader refuses them
    CASES["qlinear"] += 1
    dtype, kind, layout, lead, isa, gen, x, bias = _linear_inputs(data, N, K)
    w, sb = OPS.repack(qw, s, z, bits, gs, K)
    y = _with_isa(isa, lambda: OPS.qlinear(x, w, sb, bias, bits, gs, N, K))
    assert y.dtype == dtype and y.shape == (*lead, N)
    x2 = x.reshape(-1, K).double()
    b = None if bias is None else bias.double()
    want = ref.qlinear_ref(x2, w, sb, b, bits, gs, N, K)
    W = ref.dequantize_packed_ref(w, sb, bits, gs, N, K).double()
    scale = _step_scale(x2, sb, gs, N, K, W)
    close(y.reshape(-1, N), want, dtype, scale, f"{isa} {dtype} bits={bits} g{gs} N={N} K={K} {kind} {layout}")


@FUZZ
@given(q=quantized(), data=st.data())
def test_fuzz_qembedding(q, data):
    bits, gs, N, K, qw, s, z = q
    CASES["qembedding"] += 1
    gen = _gen(data.draw(seeds))
    lead = _lead(data.draw) or (data.draw(st.integers(0, 20)),)
    ids = torch.randint(0, N, lead, generator=gen, dtype=data.draw(st.sampled_from([torch.int64, torch.int32])))
    if data.draw(st.booleans()) and ids.dim() >= 1 and ids.shape[-1] > 1:
        ids = ids[..., ::2]  # a strided view
    dtype = data.draw(dtypes)
    w, sb = OPS.repack(qw, s, z, bits, gs, K)
    if ids.numel() and data.draw(st.integers(0, 9)) == 0:  # an id out of range: refused, naming it
        bad = ids.clone()
        bad.view(-1)[-1] = data.draw(st.sampled_from([N, N + 7, -1]))
        raises_clean(lambda: OPS.qembedding(bad, w, sb, bits, gs, N, K, dtype), "qembedding")
        return
    got = OPS.qembedding(ids, w, sb, bits, gs, N, K, dtype)
    want = ref.qembedding_ref(ids, w, sb, bits, gs, N, K, dtype)
    assert got.shape == (*ids.shape, K) and got.dtype == dtype
    assert same(got, want), f"bits={bits} g{gs} N={N} K={K} {dtype}"


def _routed_case(q, data, op: str, row_counts):
    """A drawn routed-experts call: E experts (the drawn weight with its rows rotated by e: one
    geometry, different weights), x [R, K] of a drawn dtype, kind and layout, expert ids, maybe a
    bias. One case in ten puts an expert id out of range and checks that ``op`` refuses it
    (then None is returned)."""
    bits, gs, N, K, qw, s, z = q
    E = data.draw(st.integers(1, 5))
    packed = [OPS.repack(qw.roll(e, 0), s.roll(e, 0), None if z is None else z.roll(e, 0), bits, gs, K)
              for e in range(E)]
    w, sb = torch.stack([p[0] for p in packed]), torch.stack([p[1] for p in packed])
    dtype, kind, layout = data.draw(dtypes), data.draw(kinds), data.draw(layouts)
    R = data.draw(st.sampled_from(row_counts))
    gen = _gen(data.draw(seeds))
    x = view_as(floats((R, K), dtype, kind, gen, large=1e15), layout, gen)
    ids = torch.randint(0, E, (R,), generator=gen, dtype=data.draw(st.sampled_from([torch.int64, torch.int32])))
    bias = floats((E, N), data.draw(st.sampled_from([dtype, torch.float32])), "normal", gen) \
        if data.draw(st.booleans()) else None
    if R and data.draw(st.integers(0, 9)) == 0:  # an expert id out of range: refused, naming it
        bad = ids.clone()
        bad[-1] = data.draw(st.sampled_from([E, E + 3, -1]))
        raises_clean(lambda: getattr(OPS, op)(x, w, sb, bad, bias, bits, gs, N, K), op)
        return None
    return w, sb, x, ids, bias, f"{dtype} bits={bits} g{gs} N={N} K={K} E={E} R={R} {kind} {layout}"


@FUZZ
@given(q=quantized(), data=st.data())
def test_fuzz_qlinear_routed(q, data):
    bits, gs, N, K, qw, s, z = q
    assume(torch.isfinite(s.float()).all())
    CASES["qlinear_routed"] += 1
    case = _routed_case(q, data, "qlinear_routed", [0, 1, 2, 3, 5, 17, 40])
    if case is None:
        return
    w, sb, x, ids, bias, what = case
    isa = data.draw(st.sampled_from(ISAS))
    y = _with_isa(isa, lambda: OPS.qlinear_routed(x, w, sb, ids, bias, bits, gs, N, K))
    assert y.dtype == x.dtype and y.shape == (x.shape[0], N)
    msg = f"{isa} {what}"
    x2 = x.double()
    b = None if bias is None else bias.double()
    want = ref.qlinear_routed_ref(x2, w, sb, ids, b, bits, gs, N, K)
    loop, scale = torch.empty_like(y), 0.0
    for e in ids.unique().tolist():
        rows = (ids == e).nonzero().flatten()
        be = None if bias is None else bias[e]
        loop[rows] = _with_isa(isa, lambda: OPS.qlinear(x[rows], w[e], sb[e], be, bits, gs, N, K))
        W = ref.dequantize_packed_ref(w[e], sb[e], bits, gs, N, K).double()
        scale = max(scale, _step_scale(x2[rows], sb[e], gs, N, K, W))
    assert same(y, loop), f"{msg}: differs from qlinear on each expert's rows"
    close(y, want, x.dtype, scale, msg)


@FUZZ
@given(q=quantized(), data=st.data())
def test_fuzz_qlinear_routed_a8(q, data):
    bits, gs, N, K, qw, s, z = q
    assume(bits == 4 and torch.isfinite(s.float()).all())
    CASES["qlinear_routed_a8"] += 1
    case = _routed_case(q, data, "qlinear_routed_a8", [0, 1, 2, 3, 9, 17, 40])
    if case is None:
        return
    w, sb, x, ids, bias, what = case
    path = data.draw(st.sampled_from(I8_PATHS))
    _C.set_int8_path(path)
    try:
        y = OPS.qlinear_routed_a8(x, w, sb, ids, bias, bits, gs, N, K)
        # each row as qlinear_a8 of that row alone with its expert's weights, bit for bit
        alone = [OPS.qlinear_a8(x[r:r + 1], w[e], sb[e], None if bias is None else bias[e], bits, gs, N, K)
                 for r, e in enumerate(ids.tolist())]
    finally:
        _C.set_int8_path("auto")
    assert y.dtype == x.dtype and y.shape == (x.shape[0], N)
    if alone:
        assert same(y, torch.cat(alone)), f"{path} {what}: differs from qlinear_a8 on each row alone"


def _step_scale(x2, sb, gs, N, K, W):
    """max of |x| @ S^T (S the scale of each weight) and of |x| @ |W|^T over the finite rows."""
    rows = torch.isfinite(x2).all(1)
    if not rows.any() or x2.shape[0] == 0:
        return 0.0
    xr = x2[rows].abs()
    s = sb[:, :, 0, :].permute(0, 2, 1).reshape(-1, sb.shape[1])[:N].double().abs()
    S = s.repeat_interleave(ref.group_geometry(gs, K)[0], dim=1)[:, :K]
    return max((xr @ S.t()).max().item(), (xr @ W.abs().t()).max().item())


# --- weight clustering: lut_repack, lut_linear -------------------------------------------------
@st.composite
def clustered(draw, max_n=40, max_k=300):
    bits = draw(st.sampled_from([2, 3, 4]))
    gs = draw(st.sampled_from(GROUP_SIZES))
    N = draw(st.integers(1, max_n))
    K = draw(st.one_of(st.integers(1, 40), st.integers(1, max_k)))
    gen = _gen(draw(seeds))
    from hfquant.formats.lut import pack_indices

    idx = torch.randint(0, 1 << bits, (N, K), generator=gen)
    G = ref.lut_group_geometry(gs, K)[1]
    cdtype = draw(dtypes)
    cb = floats((N, G, 1 << bits), cdtype, draw(st.sampled_from(["normal", "tiny", "large", "zeros"])), gen,
                large=1e6).sort(-1).values
    return bits, gs, N, K, pack_indices(idx, bits), cb


@FUZZ
@given(c=clustered(), poison=st.integers(0, 9))
def test_fuzz_lut_repack(c, poison):
    bits, gs, N, K, qw, cb = c
    CASES["lut_repack"] += 1
    if poison == 0:
        cb = cb.clone()
        cb.view(-1)[-1] = float("nan")
        raises_clean(lambda: OPS.lut_repack(qw, cb, bits, gs, K), "lut_repack")
        return
    got = OPS.lut_repack(qw, cb, bits, gs, K)
    want = ref.lut_repack_ref(qw, cb, bits, gs, K)
    assert same(got[0], want[0]) and same(got[1], want[1])


@FUZZ
@given(c=clustered(), data=st.data())
def test_fuzz_lut_linear(c, data):
    bits, gs, N, K, qw, cb = c
    CASES["lut_linear"] += 1
    dtype, kind, layout, lead, isa, gen, x, bias = _linear_inputs(data, N, K)
    idx, tab = OPS.lut_repack(qw, cb, bits, gs, K)
    y = _with_isa(isa, lambda: OPS.lut_linear(x, idx, tab, bias, bits, gs, N, K))
    assert y.dtype == dtype and y.shape == (*lead, N)
    x2 = x.reshape(-1, K).double()
    want = ref.lut_linear_ref(x2, idx, tab, None if bias is None else bias.double(), bits, gs, N, K)
    W = ref.lut_dequantize_packed_ref(idx, tab, gs, K).double()
    rows = torch.isfinite(x2).all(1)
    scale = (x2[rows].abs() @ W.abs().t()).max().item() if rows.any() else 0.0
    close(y.reshape(-1, N), want, dtype, scale, f"{isa} {dtype} bits={bits} g{gs} N={N} K={K} {kind} {layout}")


# --- int8 activations: int8_pack, quantize_act, int8_mm, int8_gemm, int8_linear -------------------
@st.composite
def int8_weights(draw, max_n=40, max_k=300):
    N = draw(st.integers(1, max_n))
    K = draw(st.one_of(st.integers(1, 40), st.integers(1, max_k)))
    gen = _gen(draw(seeds))
    extreme = draw(st.sampled_from(["random", "max", "min"]))
    if extreme == "random":
        w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    else:
        w = torch.full((N, K), 127 if extreme == "max" else -128, dtype=torch.int8)
    return w


@FUZZ
@given(w=int8_weights())
def test_fuzz_int8_pack(w):
    CASES["int8_pack"] += 1
    got, want = OPS.int8_pack(w), ref.int8_pack_ref(w)
    assert same(got[0], want[0]) and same(got[1], want[1])


thresholds = st.sampled_from([0.0, 0.0, 1e-3, 0.5, 6.0, float("inf")])


@FUZZ
@given(K=st.integers(1, 300), data=st.data())
def test_fuzz_quantize_act(K, data):
    CASES["quantize_act"] += 1
    dtype, kind, layout = data.draw(dtypes), data.draw(kinds), data.draw(layouts)
    lead = _lead(data.draw) or (data.draw(st.integers(0, 20)),)
    gen = _gen(data.draw(seeds))
    x = view_as(floats((*lead, K), dtype, kind, gen, large=1e30), layout, gen)
    thr = data.draw(thresholds)
    act = (torch.rand(K, generator=gen) * 4 + 0.05) if data.draw(st.booleans()) else None
    path = data.draw(st.sampled_from(I8_PATHS))
    q, s, cols = _with_i8(path, lambda: OPS.quantize_act(x, thr, act))
    rq, rs, rcols = ref.quantize_act_ref(x, thr, act)
    assert same(q, rq) and same(s, rs) and same(cols, rcols), f"{path} {dtype} {kind} {layout} thr={thr}"


@FUZZ
@given(w=int8_weights(), M=st.integers(0, 20), data=st.data())
def test_fuzz_int8_mm(w, M, data):
    CASES["int8_mm"] += 1
    N, K = w.shape
    gen = _gen(data.draw(seeds))
    xq = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    pw, cs = OPS.int8_pack(w)
    path = data.draw(st.sampled_from(I8_PATHS))
    if M and data.draw(st.integers(0, 9)) == 0:
        xq[M - 1, K - 1] = -128  # outside the activation range: refused
        raises_clean(lambda: _with_i8(path, lambda: OPS.int8_mm(xq, pw, cs, N)), "int8_mm")
        return
    assert same(_with_i8(path, lambda: OPS.int8_mm(xq, pw, cs, N)), ref.int8_mm_ref(xq, pw, cs, N))


@FUZZ
@given(w=int8_weights(), M=st.integers(0, 20), data=st.data())
def test_fuzz_int8_gemm(w, M, data):
    CASES["int8_gemm"] += 1
    N, K = w.shape
    gen = _gen(data.draw(seeds))
    xq = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    xs = floats((M,), torch.float32, data.draw(st.sampled_from(["normal", "tiny", "zeros", "nonfinite"])), gen).abs()
    ws = (torch.rand(N, generator=gen) * 0.01).to(data.draw(dtypes))
    out = data.draw(dtypes)
    bias = floats((N,), data.draw(dtypes), "normal", gen) if data.draw(st.booleans()) else None
    pw, cs = OPS.int8_pack(w)
    path = data.draw(st.sampled_from(I8_PATHS))
    y = _with_i8(path, lambda: OPS.int8_gemm(xq, xs, pw, cs, ws, bias, out, N))
    assert y.dtype == out and y.shape == (M, N)
    want = ref.int8_gemm_ref(xq, xs.double(), pw, cs, ws.double(), None if bias is None else bias.double(),
                             torch.float64, N)
    close(y, want, out, msg=f"{path} {out}")


@FUZZ
@given(w=int8_weights(), data=st.data())
def test_fuzz_int8_linear(w, data):
    CASES["int8_linear"] += 1
    N, K = w.shape
    dtype, kind, layout = data.draw(dtypes), data.draw(kinds), data.draw(layouts)
    lead = _lead(data.draw) or (data.draw(st.integers(0, 20)),)
    gen = _gen(data.draw(seeds))
    x = view_as(floats((*lead, K), dtype, kind, gen, large=1e15), layout, gen)
    ws = (torch.rand(N, generator=gen) * 0.01 + 1e-4).to(data.draw(dtypes))
    bias = floats((N,), data.draw(dtypes), "normal", gen) if data.draw(st.booleans()) else None
    act = (torch.rand(K, generator=gen) * 4 + 0.05) if data.draw(st.booleans()) else None
    thr = data.draw(thresholds)
    pw, cs = OPS.int8_pack(w.clamp(min=-127))
    path = data.draw(st.sampled_from(I8_PATHS))
    y = _with_i8(path, lambda: OPS.int8_linear(x, pw, cs, ws, bias, act, thr, N))
    assert y.dtype == dtype and y.shape == (*lead, N)
    want = ref.int8_linear_ref(x, pw, cs, ws, bias, act, thr, N).reshape(-1, N)
    # the twin runs the same float32 arithmetic; the scale bounds the int8 rounding of x
    xf = x.reshape(-1, K).double() * (1 if act is None else act.double())
    rows = torch.isfinite(xf).all(1)
    Wf = w.clamp(min=-127).double().abs() * ws.double()[:, None]
    scale = (xf[rows].abs() @ Wf.t()).max().item() if rows.any() else 0.0
    close(y.reshape(-1, N), want.double(), dtype, scale, f"{path} {dtype} {kind} {layout} thr={thr}")


# --- quantized KV cache: kv_quantize, kv_append, kv_dequantize, kv_dequantize_into ----------------
@st.composite
def kv_scheme(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    per_channel = draw(st.booleans())
    g = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
    step = 8 // bits  # D * bits must fill whole bytes
    if per_channel:
        D = draw(st.integers(1, 24)) * step
        T = draw(st.integers(0, 4)) * g
    else:
        D = g * draw(st.integers(1, 4))
        assume(D * bits % 8 == 0 and D <= 512)
        T = draw(st.integers(0, 20))
    lead = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    return bits, per_channel, g, D, T, lead


@FUZZ
@given(sch=kv_scheme(), data=st.data())
def test_fuzz_kv_quantize(sch, data):
    bits, pc, g, D, T, lead = sch
    CASES["kv_quantize"] += 1
    dtype, kind, layout = data.draw(dtypes), data.draw(kinds), data.draw(layouts)
    gen = _gen(data.draw(seeds))
    x = view_as(floats((*lead, T, D), dtype, kind, gen, large=1e4), layout, gen)
    isa = data.draw(st.sampled_from(ISAS))
    got = _with_isa(isa, lambda: OPS.kv_quantize(x, bits, g, pc))
    want = ref.kv_quantize_ref(x, bits, g, pc)
    assert all(same(a, b) for a, b in zip(got, want)), f"{isa} {dtype} {kind} {layout} bits={bits} g={g} pc={pc}"


def _stores(lead, T, D, bits, g, pc, gen):
    P = (T // g, D) if pc else (T, D // g)
    codes = torch.randint(0, 256, (*lead, T, D * bits // 8), generator=gen, dtype=torch.uint8)
    s = (torch.rand(*lead, *P, generator=gen) * 0.1).to(torch.float16)
    m = torch.randn(*lead, *P, generator=gen).to(torch.float16)
    return codes, s, m


@FUZZ
@given(sch=kv_scheme(), data=st.data())
def test_fuzz_kv_append(sch, data):
    bits, pc, g, D, T, lead = sch
    CASES["kv_append"] += 1
    gen = _gen(data.draw(seeds))
    cap = T + (data.draw(st.integers(0, 3)) * g if pc else data.draw(st.integers(0, 9)))
    t = T if pc else data.draw(st.integers(0, T))
    off = data.draw(st.integers(0, (cap - t) // g)) * g if pc else data.draw(st.integers(0, cap - t))
    dtype, kind = data.draw(dtypes), data.draw(kinds)
    x = floats((*lead, t, D), dtype, kind, gen, large=1e4)
    stores = _stores(lead, cap, D, bits, g, pc, gen)
    twin = tuple(v.clone() for v in stores)
    isa = data.draw(st.sampled_from(ISAS))
    _with_isa(isa, lambda: OPS.kv_append(x, *stores, off, bits, g, pc))
    ref.kv_append_ref(x, *twin, off, bits, g, pc)
    assert all(same(a, b) for a, b in zip(stores, twin)), f"{isa} off={off} t={t} cap={cap}"
    if off + t < cap or off > 0:
        # and out of range is refused, not written
        raises_clean(lambda: OPS.kv_append(x, *stores, cap - t + (g if pc else 1), bits, g, pc), "kv_append")


@FUZZ
@given(sch=kv_scheme(), data=st.data())
def test_fuzz_kv_dequantize(sch, data):
    bits, pc, g, D, T, lead = sch
    CASES["kv_dequantize"] += 1
    gen = _gen(data.draw(seeds))
    codes, s, m = _stores(lead, T, D, bits, g, pc, gen)
    if data.draw(st.booleans()) and s.numel():
        s.view(-1)[int(torch.randint(0, s.numel(), (1,), generator=gen))] = float("nan")
        m.view(-1)[-1] = float("inf")
    length = data.draw(st.integers(0, T))
    dtype = data.draw(dtypes)
    isa = data.draw(st.sampled_from(ISAS))
    y = _with_isa(isa, lambda: OPS.kv_dequantize(codes, s, m, length, bits, g, pc, dtype))
    assert same(y, ref.kv_dequantize_ref(codes, s, m, length, bits, g, pc, dtype)), f"{isa} length={length}"
    raises_clean(lambda: OPS.kv_dequantize(codes, s, m, T + 1, bits, g, pc, dtype), "kv_dequantize")


@FUZZ
@given(sch=kv_scheme(), data=st.data())
def test_fuzz_kv_dequantize_into(sch, data):
    bits, pc, g, D, T, lead = sch
    CASES["kv_dequantize_into"] += 1
    gen = _gen(data.draw(seeds))
    codes, s, m = _stores(lead, T, D, bits, g, pc, gen)
    length = data.draw(st.integers(0, T))
    dtype = data.draw(dtypes)
    out_t = length + data.draw(st.integers(0, 5))
    out = torch.full((*lead, out_t, D), -7.0, dtype=dtype)
    twin = out.clone()
    isa = data.draw(st.sampled_from(ISAS))
    _with_isa(isa, lambda: OPS.kv_dequantize_into(codes, s, m, out, length, bits, g, pc))
    ref.kv_dequantize_into_ref(codes, s, m, twin, length, bits, g, pc)
    assert same(out, twin), f"{isa} length={length} out_t={out_t}"
