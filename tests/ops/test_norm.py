"""hfquant::rms_norm against its pure-torch twin (ref.rms_norm_ref, the formula of Llama-family
RMSNorm modules) and a float64 oracle, on every device (CUDA runs the torch formula), every
dtype pair of x and weight, awkward sizes and strides, edge values, bad arguments; opcheck,
fuzz cases and compile fullgraph. The kernel takes the mean of squares from ATen and does the
same elementwise IEEE operations in the same order as the formula: it must match the twin
BITWISE (so a model with fused norms computes exactly what the unfused one does)."""
from __future__ import annotations

import pytest
import torch

import hfquant
import hfquant.ops  # noqa: F401  (registers the fake kernels)
from hfquant import ops, ref

from _utils import assert_close

OPS = torch.ops.hfquant
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 3, 16, 17, 64, 96, 576, 1536, 4097]


def _oracle(x, w, eps):
    """float64 mean and rsqrt, h rounded to x's dtype as the modules do, the product in float64."""
    h = x.double()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).double()
    return w.double() * h


def _eq(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and \
        torch.equal(a.nan_to_num(), b.nan_to_num())


def _tol_dtype(xdtype, wdtype):
    """The tolerance's dtype: the coarser of x's (h is rounded to it) and the output's."""
    out = torch.promote_types(xdtype, wdtype)
    return xdtype if out == torch.float32 else out


def _x(shape, dtype, gen):
    x = torch.randn(*shape, generator=gen) * torch.rand(*shape[:-1], 1, generator=gen).add(0.05) * 4
    return x.to(dtype)


def _w(d, dtype, gen):
    return (torch.rand(d, generator=gen) * 1.7 - 0.3).to(dtype)  # the default model's range: -0.3 .. 1.4


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("xdtype", DTYPES, ids=str)
@pytest.mark.parametrize("wdtype", DTYPES, ids=str)
def test_matches_twin_and_oracle(device, d, xdtype, wdtype):
    gen = torch.Generator().manual_seed(d)
    for shape in ((d,), (1, 1, d), (3, 5, d), (2, 0, d)):
        x, w = _x(shape, xdtype, gen), _w(d, wdtype, gen)
        for eps in (1e-5, 1e-6, 0.0):
            got = OPS.rms_norm(x.to(device), w.to(device), eps).cpu()
            want = ref.rms_norm_ref(x, w, eps)
            assert got.dtype == want.dtype == torch.promote_types(xdtype, wdtype) and got.shape == x.shape
            assert _eq(got, want), f"twin {shape} eps={eps}"
            # h is rounded to x's dtype: the float64 oracle may round it one step apart
            assert_close(got, _oracle(x, w, eps), _tol_dtype(xdtype, wdtype), msg=f"oracle {shape} eps={eps}")


def test_strided_and_broadcast_inputs():
    gen = torch.Generator().manual_seed(1)
    buf = _x((4, 9, 64), torch.float32, gen)
    w = _w(64, torch.float32, gen)
    for x in (buf[:, 2:7], buf.transpose(0, 1), buf[..., ::1][1:3], buf.expand(2, 4, 9, 64)):
        assert _eq(OPS.rms_norm(x, w, 1e-6), ref.rms_norm_ref(x, w, 1e-6))
    wide = _x((5, 128), torch.float32, gen)[:, ::2]  # last dimension at stride 2: copied, then normed
    assert _eq(OPS.rms_norm(wide, w, 1e-6), ref.rms_norm_ref(wide, w, 1e-6))


def test_edge_values():
    w = torch.linspace(-0.3, 1.4, 8)
    x = torch.tensor([[float("nan")] + [1.0] * 7,            # NaN: the whole row is NaN
                      [float("inf")] + [1.0] * 7,            # inf: rsqrt(inf) = 0, inf * 0 = NaN
                      [0.0] * 8,                             # zeros with eps 0: 0 * rsqrt(0) = NaN
                      [1e30] * 8,                            # x^2 overflows: h = x * 0 = 0
                      [1e-30] * 8,                           # x^2 underflows: the norm is x / sqrt(eps) ...
                      [3.0, -3.0, 0.0, 1.0, -1.0, 2.0, 0.5, 0.25]])
    for eps in (0.0, 1e-6):
        assert _eq(OPS.rms_norm(x, w, eps), ref.rms_norm_ref(x, w, eps)), eps
    assert OPS.rms_norm(x, w, 0.0)[0].isnan().all() and OPS.rms_norm(x, w, 0.0)[2].isnan().all()
    assert (OPS.rms_norm(x, w, 0.0)[3] == 0).all()


def test_bad_arguments():
    x, w = torch.randn(2, 8), torch.ones(8)
    cases = [
        ((torch.tensor(1.0), torch.ones(1), 1e-6), "x must have at least one dimension, got a scalar"),
        ((x, torch.ones(7), 1e-6), r"weight must be a vector of 8 values \(the last dimension of x\), got shape \[7\]"),
        ((x, torch.ones(2, 8), 1e-6), r"weight must be a vector of 8 values"),
        ((x.to(torch.int32), w, 1e-6), "x must be float32, bfloat16 or float16, got Int"),
        ((x, w.to(torch.float64), 1e-6), "weight must be float32, bfloat16 or float16, got Double"),
        ((x, w, -1.0), "eps must be a finite number >= 0, got -1"),
        ((x, w, float("nan")), "eps must be a finite number >= 0, got nan"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match="hfquant::rms_norm: " + match):
            OPS.rms_norm(*args)


@pytest.mark.parametrize("xdtype", DTYPES, ids=str)
def test_opcheck(xdtype):
    gen = torch.Generator().manual_seed(2)
    for shape, wdtype in (((3, 64), xdtype), ((2, 5, 96), torch.float32), ((1, 1, 576), xdtype)):
        torch.library.opcheck(OPS.rms_norm, (_x(shape, xdtype, gen), _w(shape[-1], wdtype, gen), 1e-6))


def test_fuzz():
    gen = torch.Generator().manual_seed(11)
    for case in range(60):
        d = int(torch.randint(1, 700, (1,), generator=gen))
        lead = [int(v) for v in torch.randint(0, 4, (int(torch.randint(0, 3, (1,), generator=gen)),), generator=gen)]
        xdtype = DTYPES[case % 3]
        wdtype = DTYPES[(case // 3) % 3]
        x, w = _x((*lead, d), xdtype, gen), _w(d, wdtype, gen)
        eps = [0.0, 1e-6, 1e-5, 0.1][case % 4]
        assert _eq(OPS.rms_norm(x, w, eps), ref.rms_norm_ref(x, w, eps)), f"case {case}"


def test_wrapper_backends_and_compile():
    gen = torch.Generator().manual_seed(5)
    x, w = _x((2, 3, 576), torch.float32, gen), _w(576, torch.float32, gen)
    want = ref.rms_norm_ref(x, w, 1e-5)
    with hfquant.settings(backend="ref"):
        assert torch.equal(ops.rms_norm(x, w, 1e-5), want)
    compiled = torch.compile(lambda a, b: ops.rms_norm(a, b, 1e-5), fullgraph=True, backend="eager")
    assert _eq(compiled(x, w), want)
