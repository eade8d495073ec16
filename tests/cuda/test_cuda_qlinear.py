"""hfquant::repack and hfquant::qlinear on CUDA against the pure-torch twins in hfquant/ref.py.

The CUDA layout is checked bit for bit against ref.repack_cuda_ref; outputs against the
float64 reference computed on the CPU from the same checkpoint tensors, under the
tolerance policy of tests/_utils.py. Every CUDA path is covered for every case: the
mma.sync kernel, the skinny split-K kernel (M <= 64; forced with _C.set_cuda_skinny_max_m)
and (bf16/fp16, large M) dequantize + cuBLAS (forced with _C.set_cuda_gemm_min_m).
Skipped without a GPU or a CUDA build.
"""
from __future__ import annotations

import pytest
import torch

import hfquant.ops  # noqa: F401  (registers the fake kernels)
from _utils import assert_close
from cuda_util import CUDA_OK, requires_cuda
from hfquant import ref
from hfquant._ext import _C

pytestmark = requires_cuda

GROUP_SIZES = [-1, 32, 64, 128, 256]
# odd N (row padding to 64), K ragged against every group size and the 128-k segments,
# K odd (x copied with a zero pad column), K = 1, and two real projection sizes
SHAPES = [(1, 1), (3, 17), (17, 300), (37, 576), (70, 160), (130, 1000)]
MS = [1, 2, 7, 16, 17, 33, 64, 100, 300]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = "cuda"


def _name(v):
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else str(v)


@pytest.fixture
def switches():
    """Restores the kernel switches (gemm_min_m, skinny_max_m, skinny_segs) after a test."""
    if not CUDA_OK:
        pytest.skip("no CUDA")
    prev = (_C.cuda_gemm_min_m(), _C.cuda_skinny_max_m(), _C.cuda_skinny_segs())
    yield _C
    _C.set_cuda_gemm_min_m(prev[0])
    _C.set_cuda_skinny_max_m(prev[1])
    _C.set_cuda_skinny_segs(prev[2])


@pytest.fixture(params=["mma", "skinny", "cublas"])
def path(request, switches):
    """Forces the mma.sync kernel for every M; or the skinny kernel for M <= 64 (the mma
    kernel above); or dequantize + cuBLAS for every bf16/fp16 M."""
    switches.set_cuda_gemm_min_m(0 if request.param == "cublas" else 1 << 30)
    switches.set_cuda_skinny_max_m(64 if request.param == "skinny" else 0)
    switches.set_cuda_skinny_segs(0)
    return request.param


def make_quantized(N, K, bits, group_size, asym, gen, codes=None, scale=None):
    """Random canonical checkpoint tensors (qweight, scales, zeros) on the CPU."""
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
    scales = torch.rand(N, G, generator=gen) * 0.02 + 0.001 if scale is None else torch.full((N, G), float(scale))
    zeros = torch.randint(0, 1 << bits, (N, G), generator=gen, dtype=torch.int32).to(torch.uint8) if asym else None
    return qweight, scales, zeros


def _cuda(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


def check(y, x, qw, sc, z, bias, bits, gs, N, K, dtype, msg):
    """y (CUDA) against the float64 reference of the CPU layout of the same checkpoint."""
    w, sb = ref.repack_ref(qw, sc, z, bits, gs, K)
    xc = x.cpu().reshape(-1, K).double()
    b = None if bias is None else bias.cpu().double()
    want = ref.qlinear_ref(xc, w, sb, b, bits, gs, N, K).reshape(*x.shape[:-1], N)
    gsz = ref.group_geometry(gs, K)[0]
    S = sc.double().repeat_interleave(gsz, dim=1)[:, :K]
    scale = (xc.abs() @ S.t()).max().item() if xc.numel() else 0.0
    assert y.device.type == "cuda" and y.dtype == dtype
    assert_close(y.cpu(), want, dtype, msg, scale=scale)


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_repack_matches_cuda_ref_and_inverts(bits, group_size, asym):
    gen = torch.Generator().manual_seed(1)
    for N, K in SHAPES:
        qw, sc, z = make_quantized(N, K, bits, group_size, asym, gen)
        for scales in (sc, sc.to(torch.bfloat16), sc.to(torch.float16)):
            got = torch.ops.hfquant.repack(*_cuda(qw, scales, z), bits, group_size, K)
            want = ref.repack_cuda_ref(qw, scales, z, bits, group_size, K)
            for g, w, what in zip(got, want, ("packed_weight", "packed_scales")):
                assert g.device.type == "cuda"
                assert g.dtype == w.dtype and torch.equal(g.cpu(), w), f"{what} differs for N={N} K={K}"
            # the module's inverse (on the GPU) rebuilds the checkpoint tensor exactly
            back = ref.qweight_from_packed(got[0], bits, N, K, not asym)
            assert back.device.type == "cuda" and torch.equal(back.cpu(), qw)
            # and both layouts stand for the same float weight
            wc, sbc = ref.repack_ref(qw, scales, z, bits, group_size, K)
            a = ref.dequantize_packed_ref(got[0].cpu(), got[1].cpu(), bits, group_size, N, K)
            b = ref.dequantize_packed_ref(wc, sbc, bits, group_size, N, K)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # the layouts round v * s - s * z differently


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_qlinear_matches_ref(path, bits, group_size, dtype):
    gen = torch.Generator().manual_seed(2)
    for i, (N, K) in enumerate(SHAPES):
        for j, M in enumerate(MS):
            asym, with_bias = (i + j) % 2 == 1, (i + 2 * j) % 3 != 0
            qw, sc, z = make_quantized(N, K, bits, group_size, asym, gen)
            w, ps = torch.ops.hfquant.repack(*_cuda(qw, sc, z), bits, group_size, K)
            x = torch.randn(M, K, generator=gen).to(dtype)
            bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
            y = torch.ops.hfquant.qlinear(*_cuda(x, w, ps, bias), bits, group_size, N, K)
            assert y.shape == (M, N)
            check(y, x, qw, sc, z, bias, bits, group_size, N, K, dtype,
                  f"{path} N={N} K={K} M={M} asym={asym} bias={with_bias}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_qlinear_realistic_shapes(bits, dtype):
    """Projection sizes of the default model and of a 7B model, decode to prefill M, the
    default path choice (mma below 256 rows for bf16/fp16, cuBLAS above)."""
    gen = torch.Generator().manual_seed(3)
    for N, K, gs in ((576, 1536, 128), (1536, 576, -1), (4096, 1024, 128)):
        qw, sc, z = make_quantized(N, K, bits, gs, gs == 128, gen)
        w, ps = torch.ops.hfquant.repack(*_cuda(qw, sc, z), bits, gs, K)
        bias = torch.randn(N, generator=gen).to(dtype)
        for M in (1, 5, 16, 33, 257):
            x = torch.randn(M, K, generator=gen).to(dtype)
            y = torch.ops.hfquant.qlinear(*_cuda(x, w, ps, bias), bits, gs, N, K)
            check(y, x, qw, sc, z, bias, bits, gs, N, K, dtype, f"N={N} K={K} g{gs} M={M}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_qlinear_skinny_segments(switches, bits, dtype):
    """The skinny kernel's split-K with every chunk length: one split, several, a short last
    chunk, three m16 tiles (M = 40), a column block half past Np (N = 300: Np = 320 = 2.5 blocks of 128), group planes
    spanning chunk edges (g32/g96 per packed word), more than 48 KB of shared memory (fp32,
    M = 16, 8 segments); outputs deterministic across runs (partials added in split order)."""
    switches.set_cuda_skinny_max_m(64)
    gen = torch.Generator().manual_seed(8)
    N, K = 300, 2000
    for gs, asym in ((-1, False), (32, True), (96, False), (128, True)):
        qw, sc, z = make_quantized(N, K, bits, gs, asym, gen)
        w, ps = torch.ops.hfquant.repack(*_cuda(qw, sc, z), bits, gs, K)
        bias = torch.randn(N, generator=gen).to(dtype)
        for segs in (0, 1, 3, 8):
            switches.set_cuda_skinny_segs(segs)
            for M in (1, 3, 9, 16, 40):
                x = torch.randn(M, K, generator=gen).to(dtype)
                xb, bb = _cuda(x, bias)
                y = torch.ops.hfquant.qlinear(xb, w, ps, bb, bits, gs, N, K)
                check(y, x, qw, sc, z, bias, bits, gs, N, K, dtype, f"skinny segs={segs} g{gs} M={M}")
                again = torch.ops.hfquant.qlinear(xb, w, ps, bb, bits, gs, N, K)
                assert torch.equal(y, again), f"skinny segs={segs} g{gs} M={M}: two runs differ"
    # the skinny kernel and the mma kernel compute the same function
    switches.set_cuda_skinny_segs(0)
    qw, sc, z = make_quantized(4096, 4096, bits, 128, False, gen)
    w, ps = torch.ops.hfquant.repack(*_cuda(qw, sc, z), bits, 128, 4096)
    x = torch.randn(4, 4096, generator=gen).to(dtype).to(DEV)
    y_skinny = torch.ops.hfquant.qlinear(x, w, ps, None, bits, 128, 4096, 4096)
    switches.set_cuda_skinny_max_m(0)
    y_mma = torch.ops.hfquant.qlinear(x, w, ps, None, bits, 128, 4096, 4096)
    check(y_skinny, x.cpu(), qw, sc, z, None, bits, 128, 4096, 4096, dtype, "skinny 4096x4096")
    torch.testing.assert_close(y_skinny.float(), y_mma.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-2 if dtype != torch.float32 else 1e-4)


EDGES = {"codes-min": dict(codes=0), "codes-max": dict(codes="max"), "zero-scales": dict(scale=0.0),
         "large-scales": dict(scale=1e4)}


@pytest.mark.parametrize("edge", list(EDGES), ids=str)
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_qlinear_edge_values(path, bits, edge):
    gen = torch.Generator().manual_seed(4)
    kw = dict(EDGES[edge])
    if kw.get("codes") == "max":
        kw["codes"] = (1 << bits) - 1
    N, K, gs = 17, 300, 64
    for asym in (False, True):
        qw, sc, z = make_quantized(N, K, bits, gs, asym, gen, **kw)
        w, ps = torch.ops.hfquant.repack(*_cuda(qw, sc, z), bits, gs, K)
        for M in (1, 5, 40):
            x = torch.randn(M, K, generator=gen)
            x[:, ::3] = 0.0
            x[-1] = 0.0
            for dtype in DTYPES:
                if path == "cublas" and edge == "large-scales" and dtype == torch.float16:
                    continue  # the cuBLAS path rounds the weight to fp16 first: 1e4 * 255 overflows
                xd = x.to(dtype)
                y = torch.ops.hfquant.qlinear(*_cuda(xd, w, ps), None, bits, gs, N, K)
                check(y, xd, qw, sc, z, None, bits, gs, N, K, dtype, f"{path} {edge} asym={asym} M={M} {dtype}")
                assert torch.all(y[-1] == 0), "an all-zero x row must give exactly zero"
                if edge == "zero-scales":
                    assert torch.all(y == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_qlinear_strided_and_batched_x(dtype):
    gen = torch.Generator().manual_seed(5)
    N, K, bits, gs = 37, 96, 4, 32
    qw, sc, z = make_quantized(N, K, bits, gs, True, gen)
    w, ps = torch.ops.hfquant.repack(*_cuda(qw, sc, z), bits, gs, K)
    big = torch.randn(40, 2 * K + 1, generator=gen).to(dtype).to(DEV)
    views = {
        "col-stride-2": big[:3, : 2 * K : 2],
        "row-slice-odd-offset": big[:5, 1 : K + 1],
        "transposed": big[:, :K].t().contiguous().t()[:20],
        "3d": big[:30, :K].reshape(2, 15, K),
        "empty": big[:0, :K],
    }
    for name, x in views.items():
        y = torch.ops.hfquant.qlinear(x, w, ps, None, bits, gs, N, K)
        assert y.shape == (*x.shape[:-1], N), name
        check(y, x, qw, sc, z, None, bits, gs, N, K, dtype, name)


@pytest.mark.parametrize("bits,group_size,asym", [(4, 128, False), (4, -1, True), (8, 32, True), (8, -1, False)],
                         ids=["w4-g128-sym", "w4-gch-asym", "w8-g32-asym", "w8-gch-sym"])
def test_opcheck(bits, group_size, asym):
    gen = torch.Generator().manual_seed(7)
    N, K = 17, 300
    qw, sc, z = _cuda(*make_quantized(N, K, bits, group_size, asym, gen))
    torch.library.opcheck(torch.ops.hfquant.repack.default, (qw, sc, z, bits, group_size, K))
    w, ps = torch.ops.hfquant.repack(qw, sc, z, bits, group_size, K)
    for x, bias in ((torch.randn(3, K, generator=gen), torch.randn(N, generator=gen)),
                    (torch.randn(2, 20, K, generator=gen).to(torch.bfloat16), None)):
        x, bias = _cuda(x, bias)
        torch.library.opcheck(torch.ops.hfquant.qlinear.default, (x, w, ps, bias, bits, group_size, N, K))


def test_bad_arguments_are_named():
    gen = torch.Generator().manual_seed(9)
    qw, sc, z = make_quantized(8, 64, 4, 32, True, gen)
    with pytest.raises(RuntimeError, match=r"hfquant::repack: scales is on cpu but the other arguments are on cuda"):
        torch.ops.hfquant.repack(qw.to(DEV), sc, z.to(DEV), 4, 32, 64)
    bad_z = z.clone()
    bad_z[3, 1] = 16
    with pytest.raises(RuntimeError, match=r"zero point 16 at index 7 is out of range for 4-bit \(0\.\.15\)"):
        torch.ops.hfquant.repack(*_cuda(qw, sc, bad_z), 4, 32, 64)
    with pytest.raises(RuntimeError, match=r"group_size=48 must be -1 .* multiple of 32"):
        torch.ops.hfquant.repack(*_cuda(qw, sc, z), 4, 48, 64)
    w, ps = torch.ops.hfquant.repack(*_cuda(qw, sc, z), 4, 32, 64)
    x = torch.randn(2, 64, device=DEV)
    with pytest.raises(RuntimeError, match=r"hfquant::qlinear: bias is on cpu"):
        torch.ops.hfquant.qlinear(x, w, ps, torch.randn(8), 4, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"x has last dimension 63, expected in_features=64"):
        torch.ops.hfquant.qlinear(torch.randn(2, 63, device=DEV), w, ps, None, 4, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"packed_weight has shape \[64, 64\], expected \[64, 128\]"):
        torch.ops.hfquant.qlinear(torch.randn(2, 160, device=DEV), w, ps, None, 4, 32, 8, 160)
    with pytest.raises(RuntimeError, match=r"packed_scales has shape \[2, 2, 64\], expected \[1, 1 or 2, 64\]"):
        torch.ops.hfquant.qlinear(x, w, ps, None, 4, -1, 8, 64)
    with pytest.raises(RuntimeError, match=r"x must be float32, bfloat16 or float16, got Int"):
        torch.ops.hfquant.qlinear(x.int(), w, ps, None, 4, 32, 8, 64)
    # CPU-layout tensors moved to the GPU are refused, not misread
    wc, sbc = ref.repack_ref(qw, sc, z, 4, 32, 64)
    with pytest.raises(RuntimeError, match=r"packed_weight must be a contiguous uint8 CUDA tensor"):
        torch.ops.hfquant.qlinear(x, wc.to(DEV), sbc.to(DEV), None, 4, 32, 8, 64)
