"""hfquant::repack / qlinear with format version 2's grids against their twins: float offsets
(weight = code * scale + offset, ``repack(..., offsets=...)``) and signed symmetric scales (the
"extreme" / "best" grids), every CPU ISA, group sizes, dtypes and odd shapes; the CUDA op
refuses offsets by name (its tensor-core path multiplies integer v - z)."""
from __future__ import annotations

import pytest
import torch

import hfquant.ops  # noqa: F401  (registers the fake kernels)
from _utils import assert_close
from hfquant import formats, ref
from test_qlinear import DTYPES, GROUP_SIZES, _name, _to, check

SHAPES = [(1, 1), (3, 17), (37, 576), (70, 160)]
MS = [1, 17, 130]


def make_offsets(N, K, bits, group_size, gen):
    """Random float-offset tensors (qweight of unsigned codes, scales, offsets), scales of both
    signs' magnitudes and offsets of both signs."""
    _, G = ref.group_geometry(group_size, K)
    v = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.int32)
    qweight = formats.pack_codes(v, bits, False)
    scales = torch.rand(N, G, generator=gen) * 0.02 + 0.001
    offsets = (torch.rand(N, G, generator=gen) - 0.5) * 0.2
    return qweight, scales, offsets


@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_repack_offsets_matches_ref(bits, group_size):
    gen = torch.Generator().manual_seed(11)
    for N, K in SHAPES:
        qw, sc, off = make_offsets(N, K, bits, group_size, gen)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            got = torch.ops.hfquant.repack(qw, sc.to(dt), None, bits, group_size, K, off.to(dt))
            want = ref.repack_ref(qw, sc.to(dt), None, bits, group_size, K, off.to(dt))
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"N={N} K={K} {dt}"
            # the layout stands for code * scale + offset
            w = ref.dequantize_packed_ref(got[0], got[1], bits, group_size, N, K)
            dq = formats.dequantize(qw, sc.to(dt), None, bits, group_size, K, torch.float32, offsets=off.to(dt))
            torch.testing.assert_close(w, dq, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_qlinear_offsets_matches_ref(isa, bits, group_size, dtype):
    gen = torch.Generator().manual_seed(12)
    for i, (N, K) in enumerate(SHAPES):
        qw, sc, off = make_offsets(N, K, bits, group_size, gen)
        w, sb = torch.ops.hfquant.repack(qw, sc, None, bits, group_size, K, off)
        for j, M in enumerate(MS):
            bias = torch.randn(N, generator=gen).to(dtype) if (i + j) % 2 else None
            x = torch.randn(M, K, generator=gen).to(dtype)
            y = torch.ops.hfquant.qlinear(x, w, sb, bias, bits, group_size, N, K)
            check(y, x, w, sb, bias, bits, group_size, N, K, dtype, f"{isa} N={N} K={K} M={M}")
            # and against the checkpoint's own float weight (offsets add sum(x) * m per group)
            W = formats.dequantize(qw, sc, None, bits, group_size, K, torch.float64, offsets=off)
            want = x.double() @ W.t() + (0 if bias is None else bias.double())
            assert_close(y, want, dtype, f"{isa} N={N} K={K} M={M} vs dequantize",
                         scale=(x.double().abs() @ W.abs().t()).max().item() if M * N else 0.0)


@pytest.mark.parametrize("grid", ["extreme", "best"])
@pytest.mark.parametrize("group_size", [32, 128, -1], ids=lambda g: f"g{g}")
def test_qlinear_signed_scales(isa, grid, group_size):
    """Symmetric 4-bit weights on a signed grid (negative scales) compute the weight they stand for."""
    gen = torch.Generator().manual_seed(13)
    for N, K in SHAPES:
        q = formats.quantize_rtn(torch.randn(N, K, generator=gen), 4, group_size, True, grid=grid)
        w, sb = torch.ops.hfquant.repack(q.qweight, q.scales, None, 4, group_size, K)
        assert torch.equal(sb, ref.repack_ref(q.qweight, q.scales, None, 4, group_size, K)[1])
        W = formats.dequantize(q.qweight, q.scales, None, 4, group_size, K, torch.float64)
        for M in (1, 17):
            x = torch.randn(M, K, generator=gen)
            y = torch.ops.hfquant.qlinear(x, w, sb, None, 4, group_size, N, K)
            assert_close(y, x.double() @ W.t(), torch.float32, f"{isa} N={N} K={K} M={M}",
                         scale=(x.double().abs() @ W.abs().t()).max().item())
        # a quantized embedding's lookup of those rows is exact (integer zero points come back)
        ids = torch.arange(N)
        rows = torch.ops.hfquant.qembedding(ids, w, sb, 4, group_size, N, K, torch.float32)
        assert torch.equal(rows, W.float()), f"qembedding N={N} K={K}"


def test_repack_offsets_bad_arguments():
    gen = torch.Generator().manual_seed(14)
    qw, sc, off = make_offsets(8, 64, 4, 32, gen)
    z = torch.zeros(8, 2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="zeros and offsets are exclusive"):
        torch.ops.hfquant.repack(qw, sc, z, 4, 32, 64, off)
    with pytest.raises(RuntimeError, match=r"offsets has shape \[8, 3\], expected \[8, 2\]"):
        torch.ops.hfquant.repack(qw, sc, None, 4, 32, 64, torch.zeros(8, 3))
    with pytest.raises(RuntimeError, match="offsets must be floating point"):
        torch.ops.hfquant.repack(qw, sc, None, 4, 32, 64, torch.zeros(8, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="zeros and offsets are exclusive"):
        ref.repack_ref(qw, sc, z, 4, 32, 64, off)


def test_repack_offsets_opcheck():
    gen = torch.Generator().manual_seed(15)
    for bits in (4, 8):
        qw, sc, off = make_offsets(9, 100, bits, 32, gen)
        torch.library.opcheck(torch.ops.hfquant.repack.default, (qw, sc, None, bits, 32, 100, off))
        w, sb = torch.ops.hfquant.repack(qw, sc, None, bits, 32, 100, off)
        torch.library.opcheck(torch.ops.hfquant.qlinear.default, (torch.randn(3, 100), w, sb, None, bits, 32, 9, 100))


def test_cuda_layout_refuses_offsets(device):
    gen = torch.Generator().manual_seed(16)
    qw, sc, off = make_offsets(8, 64, 4, 32, gen)
    msg = r'float offsets \(zero_point="float"\) are not supported by the CUDA kernels yet'
    with pytest.raises(ValueError, match=msg):
        ref.repack_cuda_ref(qw, sc, None, 4, 32, 64, off)
    if device == "cuda":
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.hfquant.repack(*_to(device, qw, sc), None, 4, 32, 64, off.to(device))
