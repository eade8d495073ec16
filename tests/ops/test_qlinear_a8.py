"""hfquant::qlinear_a8 (4-bit weights, int8 activations in blocks of 32) against its twin in
ref.py on every int8 kernel path (AVX-512 VNNI, AVX2, portable), and its activation
quantization against the twin's. The integer dot products are exact; the float sums differ
from the twin's float64 ones by rounding only: the tolerance policy of tests/_utils.py, scaled
by the output of a one-step weight (test_qlinear.step_scale). CPU only (no CUDA kernel)."""
from __future__ import annotations

import pytest
import torch

import hfquant.ops  # noqa: F401
from hfquant import ref

from _utils import assert_close
from test_qlinear import GROUP_SIZES, SHAPES, make_quantized, step_scale

OPS = torch.ops.hfquant
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _pack(N, K, gs, asym, gen):
    qw, sc, z = make_quantized(N, K, 4, gs, asym, gen)
    return OPS.repack(qw, sc, z, 4, gs, K)


def _check(y, x, w, sb, bias, gs, N, K, dtype, msg, dense=None):
    """y against the twin in float64: x' @ W^T (+ bias) for the twin's block-quantized x'
    (``dense``: the dequantized weight, when the caller holds it)."""
    xq = ref.quantize_act_blocks_ref(x.reshape(-1, K))[0]
    if dense is None:
        want = ref.qlinear_a8_ref(x.double() if x.dtype == torch.float32 else x, w, sb,
                                  None if bias is None else bias.double(), 4, gs, N, K).double()
    else:
        want = xq.double() @ dense.t() + (0 if bias is None else bias.double())
    assert_close(y, want.reshape(*x.shape[:-1], N), dtype, msg, scale=step_scale(xq, sb, gs, N, K))


@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qlinear_a8_matches_ref(i8path, group_size, dtype):
    gen = torch.Generator().manual_seed(3)
    for i, (N, K) in enumerate(SHAPES):
        asym = i % 2 == 1
        w, sb = _pack(N, K, group_size, asym, gen)
        dense = ref.dequantize_packed_ref(w, sb, 4, group_size, N, K).double()
        for j, M in enumerate((1, 3, 8, 17, 33)):
            with_bias = (i + 2 * j) % 3 != 0
            x = (torch.randn(M, K, generator=gen) * torch.rand(M, 1, generator=gen).add(0.1) * 4).to(dtype)
            bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
            y = OPS.qlinear_a8(x, w, sb, bias, 4, group_size, N, K)
            assert y.dtype == dtype and y.shape == (M, N)
            _check(y, x, w, sb, bias, group_size, N, K, dtype, f"{i8path} N={N} K={K} M={M} asym={asym}", dense)


def test_rows_do_not_depend_on_their_neighbours(i8path):
    """The kernels run blocks of rows (8 with AVX-512 VNNI, 2 with AVX2) and a remainder: each
    row's outputs are bit for bit those of the row alone, whatever block it falls in, for every
    dtype, a ragged K and a per-channel scale."""
    gen = torch.Generator().manual_seed(8)
    for N, K, gs in ((20, 100, 32), (36, 256, 128), (8, 200, -1)):
        w, sb = _pack(N, K, gs, True, gen)
        for dtype in DTYPES:
            x = (torch.randn(29, K, generator=gen) * 3).to(dtype)
            y = OPS.qlinear_a8(x, w, sb, None, 4, gs, N, K)
            alone = torch.cat([OPS.qlinear_a8(x[i:i + 1], w, sb, None, 4, gs, N, K) for i in range(29)])
            assert torch.equal(y, alone), f"{i8path} N={N} K={K} gs={gs} {dtype}"


def test_activation_quantization_and_edges(i8path):
    """Zero blocks, a block with one huge value (the rest round to 0), ties at .5, a ragged K,
    batched and strided x: the output is the twin's x' @ W^T."""
    gen = torch.Generator().manual_seed(4)
    N, K, gs = 20, 100, 32
    w, sb = _pack(N, K, gs, True, gen)
    x = torch.randn(3, 5, K, generator=gen)
    x[0, 0] = 0
    x[0, 1, :32] = 0
    x[0, 1, 40] = 1e4
    x[1, 2, :32] = torch.arange(32) * 0.5 - 8  # max 7.5: values on .5 steps of d = 7.5 / 127 * ...
    y = OPS.qlinear_a8(x, w, sb, None, 4, gs, N, K)
    _check(y, x, w, sb, None, gs, N, K, torch.float32, "edges")
    assert torch.equal(y[0, 0], torch.zeros(N))
    xs = torch.randn(K, 6, generator=gen).T  # strided rows
    _check(OPS.qlinear_a8(xs, w, sb, None, 4, gs, N, K), xs, w, sb, None, gs, N, K, torch.float32, "strided")
    xq, q, d = ref.quantize_act_blocks_ref(x[0, 1])
    assert q.abs().max() <= 127 and d.shape == (4,)
    assert torch.equal(xq[:32], torch.zeros(32))


def test_nonfinite_rows_are_nan(i8path):
    """A row of x holding NaN or inf gives NaN outputs, as the twin does (never finite garbage);
    the other rows are unaffected."""
    gen = torch.Generator().manual_seed(7)
    N, K, gs = 12, 96, 32
    w, sb = _pack(N, K, gs, False, gen)
    x = torch.randn(3, K, generator=gen)
    x[0, 5] = float("nan")
    x[1, 70] = float("inf")
    y = OPS.qlinear_a8(x, w, sb, None, 4, gs, N, K)
    want = ref.qlinear_a8_ref(x, w, sb, None, 4, gs, N, K)
    assert y[:2].isnan().all() and want[:2].isnan().all()
    _check(y[2:], x[2:], w, sb, None, gs, N, K, torch.float32, "finite row")


def test_fuzz(i8path):
    gen = torch.Generator().manual_seed(5)
    for _ in range(40):
        gs = [32, 64, 128, -1][int(torch.randint(0, 4, (1,), generator=gen))]
        N, K, M = (int(v) for v in torch.randint(1, 300, (3,), generator=gen))
        w, sb = _pack(N, K, gs, bool(torch.rand(1, generator=gen) < 0.5), gen)
        x = torch.randn(M % 21 + 1, K, generator=gen) * float(torch.rand(1, generator=gen) * 10)
        _check(OPS.qlinear_a8(x, w, sb, None, 4, gs, N, K), x, w, sb, None, gs, N, K, torch.float32,
               f"fuzz N={N} K={K} gs={gs}")


def test_opcheck_and_errors():
    gen = torch.Generator().manual_seed(6)
    w, sb = _pack(24, 96, 32, False, gen)
    x = torch.randn(3, 96, generator=gen)
    torch.library.opcheck(OPS.qlinear_a8.default, (x, w, sb, None, 4, 32, 24, 96))
    torch.library.opcheck(OPS.qlinear_a8.default, (x.to(torch.bfloat16), w, sb, torch.randn(24), 4, 32, 24, 96))
    for args, msg in [((x, w, sb, None, 8, 32, 24, 96), "bits=8 is not supported"),
                      ((x, w, sb, None, 4, 48, 24, 96), "group_size=48"),
                      ((x[:, :90], w, sb, None, 4, 32, 24, 96), "expected in_features=96"),
                      ((x.double(), w, sb, None, 4, 32, 24, 96), "must be float32, bfloat16 or float16"),
                      ((x, w, sb, torch.randn(5), 4, 32, 24, 96), "bias has shape"),
                      ((x, w, sb, None, 4, 32, 28, 96), "packed_weight has shape")]:
        with pytest.raises(RuntimeError, match=msg):
            OPS.qlinear_a8(*args)
