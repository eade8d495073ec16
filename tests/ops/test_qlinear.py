"""hfquant::repack and hfquant::qlinear against their pure-torch twins in hfquant/ref.py, on
every device (`device`: the CPU, and CUDA where present). The packed layout of each device is
checked bit for bit against its twin; outputs against the float64 twin over the CPU layout of
the same checkpoint tensors, under the tolerance policy of tests/_utils.py.

Every kernel path is forced in turn: on the CPU each ISA this CPU can run (the ``isa`` and
``qlinear_path`` fixtures); on CUDA (``qlinear_path``) the mma.sync kernel, the skinny split-K
kernel (M <= 64) and, for bf16/fp16, dequantize + cuBLAS. On the CPU, which of the
GEMV kernels and the blocked path (dequantize + GEMM) serves a call depends on M, the
dtype, the ISA and the layer size (tiny layers always take GEMV), so the blocked path is
covered independently of those defaults: a test forces each path for every case with
hfquant.settings (gemv_max_m, qgemm), and the realistic shape crosses the
default threshold.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import hfquant.ops  # noqa: F401  (registers the fake kernels)
from _devices import requires_cuda
from _utils import assert_close
from hfquant import ref
from hfquant._ext import _C

ISAS = _C.available_isas()
GROUP_SIZES = [-1, 32, 64, 128, 256]
# (N, K): odd N (on CUDA row padding to 64); K ragged against every group size (576 = 4.5 x 128)
# and the CUDA layout's 128-k segments, K < 32, K odd (CUDA copies x with a zero pad column),
# K = 1, and two real projection sizes
SHAPES = [(1, 1), (3, 17), (17, 300), (37, 576), (70, 160), (130, 1000)]
# M = 1 (decode), 2, 3 and 7 (M-block remainders), 16 and 17 (one m16 tile and past it; past a
# multiple of the CPU kernels' M blocks), 33 (three m16 tiles), 64 (the CUDA skinny kernel's
# largest), 100, 128, 300 (past 256: CUDA bf16/fp16 dequantize + cuBLAS)
MS = [1, 2, 3, 7, 16, 17, 33, 64, 100, 128, 300]
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
    """max of |x| @ S^T, S[n, k] = the scale of (n, k): the output of a one-step weight (0 for empty x)."""
    if x.numel() == 0:
        return 0.0
    s = sb[:, :, 0, :].permute(0, 2, 1).reshape(-1, sb.shape[1])[:N].double()  # [N, G]
    gsz = ref.group_geometry(gs, K)[0]
    S = s.repeat_interleave(gsz, dim=1)[:, :K]
    return (x.reshape(-1, K).double().abs() @ S.t()).max().item()


def check(y, x, w, sb, bias, bits, gs, N, K, dtype, msg):
    """y, computed from x on x's device, against the float64 twin over the CPU layout (w, sb)."""
    assert y.device == x.device and y.dtype == dtype, f"{msg}: {y.dtype} on {y.device}"
    y, x, bias = y.cpu(), x.cpu(), None if bias is None else bias.cpu()
    want = qlinear_ref64(x.reshape(-1, K), w, sb, bias, bits, gs, N, K).reshape(*x.shape[:-1], N)
    assert_close(y, want, dtype, msg, scale=step_scale(x, sb, gs, N, K))


def _to(device, *ts):
    return [None if t is None else t.to(device) for t in ts]


def repack_on(device, qw, sc, z, bits, gs, K):
    """(packed_weight, packed_scales) by the op on `device`, then the CPU layout of the same
    checkpoint tensors, which the float64 twin reads (on the CPU the same pair)."""
    w, sb = torch.ops.hfquant.repack(*_to(device, qw, sc, z), bits, gs, K)
    return (w, sb, w, sb) if device == "cpu" else (w, sb, *ref.repack_ref(qw, sc, z, bits, gs, K))


# the twin of repack for each device's layout
REPACK_REF = {"cpu": ref.repack_ref, "cuda": ref.repack_cuda_ref}


# ---------------------------------------------------------------------------- repack


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_repack_matches_ref_and_inverts(device, bits, group_size, asym):
    gen = torch.Generator().manual_seed(1)
    for N, K in SHAPES + [(8, 64)]:
        qw, sc, z = make_quantized(N, K, bits, group_size, asym, gen)
        for scales in (sc, sc.to(torch.bfloat16), sc.to(torch.float16)):
            got = torch.ops.hfquant.repack(*_to(device, qw, scales, z), bits, group_size, K)
            want = REPACK_REF[device](qw, scales, z, bits, group_size, K)
            for g, w, what in zip(got, want, ("packed_weight", "packed_scales")):
                assert g.device.type == device
                assert g.dtype == w.dtype and torch.equal(g.cpu(), w), f"{what} differs for N={N} K={K}"
            # the module's inverse (on the device) rebuilds the checkpoint tensor exactly
            back = ref.qweight_from_packed(got[0], bits, N, K, not asym)
            assert back.device.type == device and torch.equal(back.cpu(), qw)
            # and the device's layout stands for the same float weight as the CPU layout
            wc, sbc = ref.repack_ref(qw, scales, z, bits, group_size, K)
            a = ref.dequantize_packed_ref(got[0].cpu(), got[1].cpu(), bits, group_size, N, K)
            b = ref.dequantize_packed_ref(wc, sbc, bits, group_size, N, K)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # the layouts round v * s - s * z differently


# --------------------------------------------------------------------------- qlinear


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_qlinear_matches_ref(device, qlinear_path, bits, group_size, dtype):
    gen = torch.Generator().manual_seed(2)
    for i, (N, K) in enumerate(SHAPES):
        for j, M in enumerate(MS):
            # symmetric/asymmetric and bias/no bias alternate over the (shape, M) grid
            asym, with_bias = (i + j) % 2 == 1, (i + 2 * j) % 3 != 0
            qw, sc, z = make_quantized(N, K, bits, group_size, asym, gen)
            w, sb, wc, sbc = repack_on(device, qw, sc, z, bits, group_size, K)
            x = torch.randn(M, K, generator=gen).to(dtype)
            bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
            xd, bd = _to(device, x, bias)
            y = torch.ops.hfquant.qlinear(xd, w, sb, bd, bits, group_size, N, K)
            assert y.dtype == dtype and y.shape == (M, N)
            check(y, xd, wc, sbc, bias, bits, group_size, N, K, dtype,
                  f"{qlinear_path} N={N} K={K} M={M} asym={asym} bias={with_bias}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_qlinear_realistic_shape(device, isa, bits, dtype):
    """Projection sizes of the default model (576 x 1536 with group 128 and per channel,
    1536 x 576) and of a 7B model (4096 x 1024), decode to prefill M, each device's default path
    choice (CUDA: mma below 256 rows for bf16/fp16, cuBLAS above)."""
    gen = torch.Generator().manual_seed(3)
    for N, K, gs in ((576, 1536, 128), (576, 1536, -1), (1536, 576, -1), (4096, 1024, 128)):
        qw, sc, z = make_quantized(N, K, bits, gs, gs == 128, gen)
        w, sb, wc, sbc = repack_on(device, qw, sc, z, bits, gs, K)
        bias = torch.randn(N, generator=gen).to(dtype)
        for M in (1, 5, 16, 33, 257) if isa != "portable" else (1, 33):
            x = torch.randn(M, K, generator=gen).to(dtype)
            xd, bd = _to(device, x, bias)
            y = torch.ops.hfquant.qlinear(xd, w, sb, bd, bits, gs, N, K)
            check(y, xd, wc, sbc, bias, bits, gs, N, K, dtype, f"{isa} N={N} K={K} g{gs} M={M}")


EDGES = {
    "codes-min": dict(codes=0),
    "codes-max": dict(codes="max"),
    "zero-scales": dict(scale=0.0),
    "large-scales": dict(scale=1e4),
}


@pytest.mark.parametrize("edge", list(EDGES), ids=str)
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_qlinear_edge_values(device, qlinear_path, bits, edge):
    gen = torch.Generator().manual_seed(4)
    kw = dict(EDGES[edge])
    if kw.get("codes") == "max":
        kw["codes"] = (1 << bits) - 1
    N, K, gs = 17, 300, 64
    for asym in (False, True):
        qw, sc, z = make_quantized(N, K, bits, gs, asym, gen, **kw)
        w, sb, wc, sbc = repack_on(device, qw, sc, z, bits, gs, K)
        for M in (1, 5, 40):
            x = torch.randn(M, K, generator=gen)
            x[:, ::3] = 0.0  # exact zeros among the activations
            x[-1] = 0.0  # and one all-zero row
            for dtype in DTYPES:
                if qlinear_path == "cublas" and edge == "large-scales" and dtype == torch.float16:
                    continue  # the cuBLAS path rounds the weight to fp16 first: 1e4 * 255 overflows
                xd = x.to(dtype).to(device)
                y = torch.ops.hfquant.qlinear(xd, w, sb, None, bits, gs, N, K)
                check(y, xd, wc, sbc, None, bits, gs, N, K, dtype,
                      f"{qlinear_path} {edge} asym={asym} M={M} {dtype}")
                assert torch.all(y[-1] == 0), "an all-zero x row must give exactly zero"
                if edge == "zero-scales":
                    assert torch.all(y == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_qlinear_strided_and_batched_x(device, isa, dtype):
    """Non-contiguous x (column stride 2, row-strided slices, transposed; rows an odd number of
    elements apart), 3-D x and empty x."""
    gen = torch.Generator().manual_seed(5)
    N, K, bits, gs = 37, 96, 4, 32
    qw, sc, z = make_quantized(N, K, bits, gs, True, gen)
    w, sb, wc, sbc = repack_on(device, qw, sc, z, bits, gs, K)
    big = torch.randn(40, 2 * K + 1, generator=gen).to(dtype).to(device)
    views = {
        "col-stride-2": big[:3, :2 * K:2],
        "row-slice": big[:5, K // 2:K // 2 + K],
        "row-slice-odd-offset": big[:5, 1:K + 1],
        "transposed": big[:, :K].t().contiguous().t()[:20],
        "3d": big[:30, :K].reshape(2, 15, K),
        "3d-blocked": big[:, :K].reshape(2, 20, K).repeat(1, 4, 1),
        "empty": big[:0, :K],
    }
    for name, x in views.items():
        y = torch.ops.hfquant.qlinear(x, w, sb, None, bits, gs, N, K)
        assert y.shape == (*x.shape[:-1], N), name
        check(y, x, wc, sbc, None, bits, gs, N, K, dtype, f"{isa} {name}")


@pytest.mark.parametrize("max_m,gemm", [(0, False), (0, True), (1000, True)],
                         ids=["all-blocked", "all-gemm", "all-gemv"])
def test_qlinear_forced_path(max_m, gemm):
    """settings.gemv_max_m=0 sends every M past the GEMV kernels: with settings.qgemm=False to the
    blocked path (dequantize + ATen GEMM), else, for fp32/fp16 x on AVX-512, to the
    register-blocked Gemm kernel; settings.gemv_max_m=1000 sends every M to the GEMV kernels."""
    gen = torch.Generator().manual_seed(6)
    before = hfquant.settings.as_dict()
    for isa in ISAS:
        with hfquant.settings(isa=isa, gemv_max_m=max_m, qgemm=gemm):
            shapes = ((3, 17), (17, 300), (37, 576))
            for bits, gs, asym, (N, K) in itertools.product((4, 8), (-1, 32, 128), (False, True), shapes):
                G = ref.group_geometry(gs, K)[1]
                qw = torch.randint(0, 256, (N, (K + 1) // 2 if bits == 4 else K), generator=gen, dtype=torch.uint8)
                if bits == 8 and not asym:
                    qw = qw.view(torch.int8)
                z = (torch.randint(0, 1 << bits, (N, G), generator=gen, dtype=torch.int32).to(torch.uint8)
                     if asym else None)
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
    assert hfquant.settings.as_dict() == before


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("bits,group_size,asym", [(4, 128, False), (4, -1, True), (8, 32, True), (8, -1, False)],
                         ids=["w4-g128-sym", "w4-gch-asym", "w8-g32-asym", "w8-gch-sym"])
def test_opcheck(device, bits, group_size, asym):
    gen = torch.Generator().manual_seed(7)
    N, K = 17, 300
    qw, sc, z = _to(device, *make_quantized(N, K, bits, group_size, asym, gen))
    torch.library.opcheck(torch.ops.hfquant.repack.default, (qw, sc, z, bits, group_size, K))
    w, sb = torch.ops.hfquant.repack(qw, sc, z, bits, group_size, K)
    for x, bias in ((torch.randn(3, K, generator=gen), torch.randn(N, generator=gen)),
                    (torch.randn(2, 20, K, generator=gen).to(torch.bfloat16), None)):
        x, bias = _to(device, x, bias)
        torch.library.opcheck(torch.ops.hfquant.qlinear.default, (x, w, sb, bias, bits, group_size, N, K))


# ------------------------------------------------------------------------------ errors


def _packed(bits=4, gs=32, N=8, K=64):
    gen = torch.Generator().manual_seed(8)
    qw, sc, z = make_quantized(N, K, bits, gs, False, gen)
    return torch.ops.hfquant.repack(qw, sc, z, bits, gs, K)


def test_repack_rejects_bad_arguments(device):
    gen = torch.Generator().manual_seed(9)
    qw, sc, z = _to(device, *make_quantized(8, 64, 4, 32, True, gen))
    with pytest.raises(RuntimeError, match=r"group_size=48 must be -1 .* multiple of 32"):
        torch.ops.hfquant.repack(qw, sc, z, 4, 48, 64)
    bad_z = z.clone()
    bad_z[3, 1] = 16
    with pytest.raises(RuntimeError, match=r"zero point 16 at index 7 is out of range for 4-bit \(0\.\.15\)"):
        torch.ops.hfquant.repack(qw, sc, bad_z, 4, 32, 64)
    if device == "cuda":
        msg = r"hfquant::repack: scales is on cpu but the other arguments are on cuda"
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.hfquant.repack(qw, sc.cpu(), z, 4, 32, 64)
        return
    with pytest.raises(RuntimeError, match=r"hfquant::repack: bits=3 is not supported"):
        torch.ops.hfquant.repack(qw, sc, z, 3, 32, 64)
    with pytest.raises(RuntimeError, match=r"scales has shape \[8, 3\], expected \[8, 2\]"):
        torch.ops.hfquant.repack(qw, torch.rand(8, 3), z, 4, 32, 64)
    with pytest.raises(RuntimeError, match=r"4-bit qweight has 33 columns, expected ceil\(in_features/2\)=32"):
        torch.ops.hfquant.repack(torch.zeros(8, 33, dtype=torch.uint8), sc, z, 4, 32, 64)
    with pytest.raises(RuntimeError, match=r"4-bit qweight must be uint8, got Char"):
        torch.ops.hfquant.repack(qw.to(torch.int8), sc, z, 4, 32, 64)
    with pytest.raises(RuntimeError, match=r"symmetric qweight must be int8"):
        torch.ops.hfquant.repack(torch.zeros(8, 64, dtype=torch.uint8), sc, None, 8, 32, 64)


def test_qlinear_rejects_bad_arguments(device):
    if device == "cpu":
        w, sb = _packed()
    else:  # asymmetric: packed_scales [G, 2, Np]
        gen = torch.Generator().manual_seed(9)
        qw, sc, z = make_quantized(8, 64, 4, 32, True, gen)
        w, sb = torch.ops.hfquant.repack(*_to(device, qw, sc, z), 4, 32, 64)
    x = torch.randn(2, 64, device=device)
    with pytest.raises(RuntimeError, match=r"x has last dimension 63, expected in_features=64"):
        torch.ops.hfquant.qlinear(torch.randn(2, 63, device=device), w, sb, None, 4, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"x must be float32, bfloat16 or float16, got Int"):
        torch.ops.hfquant.qlinear(torch.ones(2, 64, dtype=torch.int32, device=device), w, sb, None, 4, 32, 8, 64)
    if device == "cuda":
        with pytest.raises(RuntimeError, match=r"hfquant::qlinear: bias is on cpu"):
            torch.ops.hfquant.qlinear(x, w, sb, torch.randn(8), 4, 32, 8, 64)
        with pytest.raises(RuntimeError, match=r"packed_weight has shape \[64, 64\], expected \[64, 128\]"):
            torch.ops.hfquant.qlinear(torch.randn(2, 160, device=device), w, sb, None, 4, 32, 8, 160)
        with pytest.raises(RuntimeError, match=r"packed_scales has shape \[2, 2, 64\], expected \[1, 1 or 2, 64\]"):
            torch.ops.hfquant.qlinear(x, w, sb, None, 4, -1, 8, 64)
        # CPU-layout tensors moved to the GPU are refused, not misread
        wc, sbc = ref.repack_ref(qw, sc, z, 4, 32, 64)
        with pytest.raises(RuntimeError, match=r"packed_weight must be a contiguous uint8 CUDA tensor"):
            torch.ops.hfquant.qlinear(x, wc.to(device), sbc.to(device), None, 4, 32, 8, 64)
        return
    with pytest.raises(RuntimeError, match=r"hfquant::qlinear: bits=3 is not supported"):
        torch.ops.hfquant.qlinear(x, w, sb, None, 3, 32, 8, 64)
    with pytest.raises(RuntimeError, match=r"hfquant::qlinear: group_size=48"):
        torch.ops.hfquant.qlinear(x, w, sb, None, 4, 48, 8, 64)
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


# ---------------------------------------------------------------------- CUDA skinny kernel


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_qlinear_skinny_segments(cuda_switches, bits, dtype):
    """The CUDA skinny kernel's split-K with every chunk length: one split, several, a short last
    chunk, three m16 tiles (M = 40), a column block half past Np (N = 300: Np = 320 = 2.5 blocks of 128), group planes
    spanning chunk edges (g32/g96 per packed word), more than 48 KB of shared memory (fp32,
    M = 16, 8 segments); outputs deterministic across runs (partials added in split order)."""
    device, switches = "cuda", cuda_switches
    switches.set_cuda_skinny_max_m(64)
    gen = torch.Generator().manual_seed(8)
    N, K = 300, 2000
    for gs, asym in ((-1, False), (32, True), (96, False), (128, True)):
        qw, sc, z = make_quantized(N, K, bits, gs, asym, gen)
        w, ps, wc, sbc = repack_on(device, qw, sc, z, bits, gs, K)
        bias = torch.randn(N, generator=gen).to(dtype)
        for segs in (0, 1, 3, 8):
            switches.set_cuda_skinny_segs(segs)
            for M in (1, 3, 9, 16, 40):
                x = torch.randn(M, K, generator=gen).to(dtype)
                xb, bb = _to(device, x, bias)
                y = torch.ops.hfquant.qlinear(xb, w, ps, bb, bits, gs, N, K)
                check(y, xb, wc, sbc, bias, bits, gs, N, K, dtype, f"skinny segs={segs} g{gs} M={M}")
                again = torch.ops.hfquant.qlinear(xb, w, ps, bb, bits, gs, N, K)
                assert torch.equal(y, again), f"skinny segs={segs} g{gs} M={M}: two runs differ"
    # the skinny kernel and the mma kernel compute the same function
    switches.set_cuda_skinny_segs(0)
    qw, sc, z = make_quantized(4096, 4096, bits, 128, False, gen)
    w, ps, wc, sbc = repack_on(device, qw, sc, z, bits, 128, 4096)
    x = torch.randn(4, 4096, generator=gen).to(dtype).to(device)
    y_skinny = torch.ops.hfquant.qlinear(x, w, ps, None, bits, 128, 4096, 4096)
    switches.set_cuda_skinny_max_m(0)
    y_mma = torch.ops.hfquant.qlinear(x, w, ps, None, bits, 128, 4096, 4096)
    check(y_skinny, x, wc, sbc, None, bits, 128, 4096, 4096, dtype, "skinny 4096x4096")
    torch.testing.assert_close(y_skinny.float(), y_mma.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-2 if dtype != torch.float32 else 1e-4)
