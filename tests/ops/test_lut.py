"""hfquant::lut_repack and hfquant::lut_linear (CPU) against their pure-torch twins in hfquant/ref.py.

Every kernel path this CPU can run is forced in turn (the ``isa`` fixture). Small layers run
the GEMV kernels at every M; the realistic shape crosses the default GEMV/blocked threshold,
and a test sends every case to the blocked path (hfquant.settings.gemv_max_m=0).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import hfquant.ops  # noqa: F401  (registers the fake kernels)
from _utils import assert_close
from hfquant import ref
from hfquant._ext import _C
from hfquant.formats import pack_indices, unpack_indices

BITS = [2, 3, 4]
GROUP_SIZES = [-1, 32, 128]
# (N, K): N = 1 and odd N (row-block tails of 4 and 2), K = 1, K < 32, K odd, K ragged
# against every group size (300 = 2.3 x 128), a real width
SHAPES = [(1, 1), (3, 17), (17, 300), (38, 576)]
MS = [1, 2, 7, 33, 128]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _name(v):
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else str(v)


def make_lut(N, K, bits, group_size, gen, index=None, value=None):
    """Random checkpoint tensors (qweight, codebook float32) as lut_repack takes them."""
    _, G = ref.lut_group_geometry(group_size, K)
    if index is None:
        idx = torch.randint(0, 1 << bits, (N, K), generator=gen)
    else:
        idx = torch.full((N, K), index)
    if value is None:
        cb = torch.sort(torch.randn(N, G, 1 << bits, generator=gen) * 0.05, dim=-1)[0]
    else:
        cb = torch.full((N, G, 1 << bits), float(value))
    return pack_indices(idx, bits), cb


def check(y, x, idx, tab, bias, bits, gs, N, K, dtype, msg, w=None):
    """y against x @ W^T + bias in float64, W decoded from the layout by the twin (pass w to reuse it)."""
    w = ref.lut_dequantize_packed_ref(idx, tab, gs, K).double() if w is None else w
    x2 = x.reshape(-1, K).double()
    want = x2 @ w.t()
    if bias is not None:
        want = want + bias.double()
    # |x| @ |W|^T bounds the fp32 accumulation error of any summation order
    scale = (x2.abs() @ w.abs().t()).max().item()
    assert_close(y, want.reshape(*x.shape[:-1], N), dtype, msg, scale=scale)


# ---------------------------------------------------------------------------- format


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_pack_indices_roundtrip_and_layout(bits):
    gen = torch.Generator().manual_seed(0)
    for K in (1, 7, 8, 9, 17, 300):
        idx = torch.randint(0, 1 << bits, (5, K), generator=gen)
        q = pack_indices(idx, bits)
        assert q.dtype == torch.uint8 and q.shape == (5, -(-K * bits // 8))
        assert torch.equal(unpack_indices(q, bits, K), idx)
        # the definition: index k at bits [bits*k, bits*k + bits) of the little-endian row stream
        stream = int.from_bytes(bytes(q[2].tolist()), "little")
        assert [(stream >> (bits * k)) & ((1 << bits) - 1) for k in range(K)] == idx[2].tolist()
        assert stream >> (bits * K) == 0, "padding bits must be zero"


def test_pack_indices_3bit_example():
    # 8 indices in 3 bytes, low bits first: 1,2,3,4,5,6,7,0 -> 0b000_111_110_101_100_011_010_001
    q = pack_indices(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]]), 3)
    assert q.tolist() == [[0b11010001, 0b01011000, 0b00011111]]


# ---------------------------------------------------------------------------- repack


@pytest.mark.parametrize("group_size", GROUP_SIZES + [64, 256], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_lut_repack_matches_ref_and_inverts(bits, group_size):
    gen = torch.Generator().manual_seed(1)
    for N, K in SHAPES:
        qw, cb = make_lut(N, K, bits, group_size, gen)
        for codebook in (cb, cb.to(torch.bfloat16), cb.to(torch.float16)):
            got = torch.ops.hfquant.lut_repack(qw, codebook, bits, group_size, K)
            want = ref.lut_repack_ref(qw, codebook, bits, group_size, K)
            for g, w, what in zip(got, want, ("packed_indices", "packed_codebook")):
                assert g.dtype == w.dtype and torch.equal(g, w), f"{what} differs for N={N} K={K}"
        assert torch.equal(ref.lut_qweight_from_packed(got[0], bits, K), qw), "canonical qweight not rebuilt exactly"


# --------------------------------------------------------------------------- lut_linear


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_lut_linear_matches_ref(isa, bits, group_size, dtype):
    gen = torch.Generator().manual_seed(2)
    for i, (N, K) in enumerate(SHAPES):
        qw, cb = make_lut(N, K, bits, group_size, gen)
        idx, tab = torch.ops.hfquant.lut_repack(qw, cb, bits, group_size, K)
        for j, M in enumerate(MS):
            with_bias = (i + j) % 2 == 0
            x = torch.randn(M, K, generator=gen).to(dtype)
            bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
            y = torch.ops.hfquant.lut_linear(x, idx, tab, bias, bits, group_size, N, K)
            assert y.dtype == dtype and y.shape == (M, N)
            check(y, x, idx, tab, bias, bits, group_size, N, K, dtype, f"{isa} N={N} K={K} M={M} bias={with_bias}")


def test_lut_linear_realistic_shape(isa):
    """A real projection size (1536 x 576; one codebook per row, and group 128) past the GEMV threshold."""
    gen = torch.Generator().manual_seed(3)
    N, K = 1536, 576
    for bits, gs in ((4, -1), (3, 128), (2, -1)):
        qw, cb = make_lut(N, K, bits, gs, gen)
        idx, tab = torch.ops.hfquant.lut_repack(qw, cb, bits, gs, K)
        w = ref.lut_dequantize_packed_ref(idx, tab, gs, K).double()
        bias = torch.randn(N, generator=gen)
        for M in (1, 5, 40, 130):
            x = torch.randn(M, K, generator=gen)
            y = torch.ops.hfquant.lut_linear(x, idx, tab, bias, bits, gs, N, K)
            check(y, x, idx, tab, bias, bits, gs, N, K, torch.float32, f"{isa} {bits}bit g{gs} M={M}", w=w)


EDGES = {
    "index-min": dict(index=0),
    "index-max": dict(index="max"),
    "zero-codebook": dict(value=0.0),
    "large-codebook": dict(value=1e4),
}


@pytest.mark.parametrize("edge", list(EDGES), ids=str)
def test_lut_linear_edge_values(isa, edge):
    gen = torch.Generator().manual_seed(4)
    N, K, gs = 17, 300, 64
    for bits in BITS:
        kw = dict(EDGES[edge])
        if kw.get("index") == "max":
            kw["index"] = (1 << bits) - 1
        qw, cb = make_lut(N, K, bits, gs, gen, **kw)
        idx, tab = torch.ops.hfquant.lut_repack(qw, cb, bits, gs, K)
        for M in (1, 5, 40):
            x = torch.randn(M, K, generator=gen)
            x[:, ::3] = 0.0
            x[-1] = 0.0  # an all-zero row
            for dtype in DTYPES:
                xd = x.to(dtype)
                y = torch.ops.hfquant.lut_linear(xd, idx, tab, None, bits, gs, N, K)
                check(y, xd, idx, tab, None, bits, gs, N, K, dtype, f"{isa} {edge} {bits}bit M={M} {dtype}")
                assert torch.all(y[-1] == 0), "an all-zero x row must give exactly zero"
                if edge == "zero-codebook":
                    assert torch.all(y == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_lut_linear_strided_and_batched_x(isa, dtype):
    gen = torch.Generator().manual_seed(5)
    N, K, bits, gs = 37, 96, 3, 32
    qw, cb = make_lut(N, K, bits, gs, gen)
    idx, tab = torch.ops.hfquant.lut_repack(qw, cb, bits, gs, K)
    big = torch.randn(40, 2 * K, generator=gen).to(dtype)
    views = {
        "col-stride-2": big[:3, ::2],
        "row-slice": big[:5, K // 2:K // 2 + K],
        "transposed": big[:, :K].t().contiguous().t()[:20],
        "3d": big[:30, :K].reshape(2, 15, K),
    }
    for name, x in views.items():
        y = torch.ops.hfquant.lut_linear(x, idx, tab, None, bits, gs, N, K)
        assert y.shape == (*x.shape[:-1], N), name
        check(y, x, idx, tab, None, bits, gs, N, K, dtype, f"{isa} {name}")


def test_lut_linear_forced_blocked_path():
    """settings.gemv_max_m=0 sends every M, on every path and layer size, to the blocked path
    (decode + GEMM). The GEMV kernels serve every M of the small shapes above (layers below
    256K weights never leave them), so they need no forcing."""
    gen = torch.Generator().manual_seed(6)
    before = hfquant.settings.as_dict()
    for isa in _C.available_isas():
        with hfquant.settings(isa=isa, gemv_max_m=0):
            for bits, gs, (N, K) in itertools.product((2, 3, 4), (-1, 32), ((3, 17), (37, 300))):
                G = ref.lut_group_geometry(gs, K)[1]
                qw = pack_indices(torch.randint(0, 1 << bits, (N, K), generator=gen), bits)
                cb = torch.randn(N, G, 1 << bits, generator=gen)
                idx, tab = torch.ops.hfquant.lut_repack(qw, cb, bits, gs, K)
                w = ref.lut_dequantize_packed_ref(idx, tab, gs, K).double()
                for M, (dtype, tol) in ((5, (torch.float32, 1e-4)), (64, (torch.bfloat16, 1e-2)),
                                        (33, (torch.float16, 2e-3))):
                    x = torch.randn(M, K, generator=gen).to(dtype)
                    b = torch.randn(N, generator=gen).to(dtype) if M % 2 else None
                    y = torch.ops.hfquant.lut_linear(x, idx, tab, b, bits, gs, N, K).double()
                    want = ref.lut_linear_ref(x.double(), idx, tab, None if b is None else b.double(), bits, gs, N, K)
                    scale = max(want.abs().max().item(), (x.double().abs() @ w.abs().t()).max().item())
                    err = (y - want).abs().max().item()
                    assert err <= tol * scale, (isa, bits, gs, N, K, M, dtype, err / scale)
    assert hfquant.settings.as_dict() == before


def test_lut_backend_ref_matches_native():
    """settings.backend="ref" routes the wrappers to the twins: same layout, same outputs."""
    gen = torch.Generator().manual_seed(10)
    N, K, bits, gs = 20, 100, 4, 32
    qw, cb = make_lut(N, K, bits, gs, gen)
    x = torch.randn(3, K, generator=gen)
    native = hfquant.ops.lut_repack(qw, cb, bits, gs, K)
    y_native = hfquant.ops.lut_linear(x, *native, None, bits, gs, N, K)
    with hfquant.settings(backend="ref"):
        twin = hfquant.ops.lut_repack(qw, cb, bits, gs, K)
        assert all(torch.equal(a, b) for a, b in zip(native, twin))
        check(y_native, x, *twin, None, bits, gs, N, K, torch.float32, "ref backend")
        assert hfquant.ops.lut_linear(x, *twin, None, bits, gs, N, K).dtype == torch.float32


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("bits,group_size", [(4, -1), (3, 32), (2, 128)], ids=["4bit-row", "3bit-g32", "2bit-g128"])
def test_opcheck(bits, group_size):
    gen = torch.Generator().manual_seed(7)
    N, K = 17, 300
    qw, cb = make_lut(N, K, bits, group_size, gen)
    torch.library.opcheck(torch.ops.hfquant.lut_repack.default, (qw, cb, bits, group_size, K))
    idx, tab = torch.ops.hfquant.lut_repack(qw, cb, bits, group_size, K)
    for x, bias in ((torch.randn(3, K, generator=gen), torch.randn(N, generator=gen)),
                    (torch.randn(2, 20, K, generator=gen).to(torch.bfloat16), None)):
        torch.library.opcheck(torch.ops.hfquant.lut_linear.default, (x, idx, tab, bias, bits, group_size, N, K))


# ------------------------------------------------------------------------------ errors


def test_lut_repack_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(9)
    qw, cb = make_lut(8, 64, 4, 32, gen)
    with pytest.raises(RuntimeError, match=r"hfquant::lut_repack: bits=5 is not supported \(use 2, 3 or 4\)"):
        torch.ops.hfquant.lut_repack(qw, cb, 5, 32, 64)
    with pytest.raises(RuntimeError, match=r"group_size=48 must be -1 .* multiple of 32"):
        torch.ops.hfquant.lut_repack(qw, cb, 4, 48, 64)
    with pytest.raises(RuntimeError, match=r"qweight has 32 columns, expected ceil\(in_features \* bits / 8\)=24"):
        torch.ops.hfquant.lut_repack(qw, cb[..., :8], 3, 32, 64)
    with pytest.raises(RuntimeError, match=r"qweight must be uint8, got Char"):
        torch.ops.hfquant.lut_repack(qw.to(torch.int8), cb, 4, 32, 64)
    with pytest.raises(RuntimeError, match=r"codebook has shape \[8, 2, 8\], expected \[8, 2, 16\]"):
        torch.ops.hfquant.lut_repack(qw, cb[..., :8], 4, 32, 64)
    with pytest.raises(RuntimeError, match=r"codebook must be float32, bfloat16 or float16, got Double"):
        torch.ops.hfquant.lut_repack(qw, cb.double(), 4, 32, 64)
    bad = cb.clone()
    bad[3, 1, 5] = float("nan")
    with pytest.raises(RuntimeError, match=r"codebook contains NaN or Inf \(row 3, group 1, entry 5\)"):
        torch.ops.hfquant.lut_repack(qw, bad, 4, 32, 64)


def test_lut_linear_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(8)
    qw, cb = make_lut(8, 64, 4, 32, gen)
    idx, tab = torch.ops.hfquant.lut_repack(qw, cb, 4, 32, 64)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"hfquant::lut_linear: bits=1 is not supported"):
        torch.ops.hfquant.lut_linear(x, idx, tab, None, 1, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"hfquant::lut_linear: group_size=48"):
        torch.ops.hfquant.lut_linear(x, idx, tab, None, 4, 48, 8, 64)
    with pytest.raises(RuntimeError, match=r"x has last dimension 63, expected in_features=64"):
        torch.ops.hfquant.lut_linear(torch.randn(2, 63), idx, tab, None, 4, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"x must be float32, bfloat16 or float16, got Int"):
        torch.ops.hfquant.lut_linear(torch.ones(2, 64, dtype=torch.int32), idx, tab, None, 4, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"packed indices have shape \[8, 32\], expected \[8, 48\]"):
        torch.ops.hfquant.lut_linear(torch.randn(2, 96), idx, tab, None, 4, 32, 8, 96)
    with pytest.raises(RuntimeError, match=r"packed indices must be a contiguous uint8 CPU tensor"):
        torch.ops.hfquant.lut_linear(x, idx.to(torch.int8), tab, None, 4, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"packed codebook has shape \[8, 2, 16\], expected \[8, 1, 16\]"):
        torch.ops.hfquant.lut_linear(x, idx, tab, None, 4, -1, 8, 64)
    with pytest.raises(RuntimeError, match=r"packed codebook must be a contiguous float32 CPU tensor"):
        torch.ops.hfquant.lut_linear(x, idx, tab.double(), None, 4, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"bias has shape \[7\], expected \[8\]"):
        torch.ops.hfquant.lut_linear(x, idx, tab, torch.randn(7), 4, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"out_features=0 and in_features=64 must be positive"):
        torch.ops.hfquant.lut_linear(x, idx, tab, None, 4, 32, 0, 64)
