"""hfquant::hadamard_transform (and its in-place form) against the pure-torch twin in ref.py,
on every device (the CPU, CUDA where present: there the op runs the torch butterflies) and
every CPU kernel path.

The transform is additions and subtractions in a fixed butterfly order, then one float32
multiply: the kernel must match the twin BITWISE in float32, bfloat16 and float16 (fp
contraction is off for the file). The twin itself is checked against the dense orthonormal
matrix diag(s) H / sqrt(p) (an independent oracle), the inverse against the forward, and
autograd against the transposed matrix.
"""
from __future__ import annotations

import math

import pytest
import torch

import hfquant.ops  # noqa: F401  (registers the fake kernels)
from hfquant import ops, ref
from hfquant.algorithms.rotation import HadamardRotation, hadamard_matrix

OPS = torch.ops.hfquant
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LENGTHS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]


def _signs(p, gen, device="cpu"):
    return (torch.randint(0, 2, (p,), generator=gen) * 2 - 1).to(torch.float32).to(device)


def _x(shape, dtype, gen, device="cpu"):
    x = torch.randn(*shape, generator=gen) * torch.rand(*shape[:-1], 1, generator=gen).add(0.1) * 3
    return x.to(dtype).to(device)


def _eq(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and \
        torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("p", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_twin_bitwise(device, isa, p, dtype):
    gen = torch.Generator().manual_seed(p)
    for shape in ((p,), (3, p), (2, 3, 5, p), (1, 1, 7, p)):
        x = _x(shape, dtype, gen, device)
        s = _signs(p, gen, device)
        for signs in (None, s):
            for inverse in (False, True):
                got = OPS.hadamard_transform(x, signs, inverse)
                want = ref.hadamard_transform_ref(x.cpu(), None if signs is None else signs.cpu(), inverse)
                assert _eq(got.cpu(), want), (shape, dtype, signs is not None, inverse)
                y = x.clone()
                OPS.hadamard_transform_inplace(y, signs, inverse)
                assert _eq(y.cpu(), want), ("inplace", shape, dtype, signs is not None, inverse)


@pytest.mark.parametrize("p", [1, 2, 8, 64, 512])
def test_twin_is_the_orthonormal_matrix(p):
    """forward = x (diag(s) H / sqrt(p))^T row-wise; inverse undoes it; norms are kept."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, p, generator=gen, dtype=torch.float64)
    s = _signs(p, gen)
    h = hadamard_matrix(p)
    want = (x * s.double()) @ h.T / math.sqrt(p)
    got = ref.hadamard_transform_ref(x.float(), s)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * math.sqrt(p))
    back = ref.hadamard_transform_ref(got, s, inverse=True)
    torch.testing.assert_close(back.double(), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1).double(), x.norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_noncontiguous_and_strided_rows(isa):
    """Leading dimensions at any stride (a slice of a cache buffer); a transposed last dim is
    copied by the functional op and refused by the in-place one."""
    gen = torch.Generator().manual_seed(3)
    buf = torch.randn(2, 3, 40, 64, generator=gen)
    s = _signs(64, gen)
    view = buf[:, :, 5:29, :]  # rows at stride 64, heads at stride 40 * 64
    want = ref.hadamard_transform_ref(view.contiguous(), s, inverse=True)
    assert _eq(OPS.hadamard_transform(view, s, True), want)
    before = buf.clone()
    OPS.hadamard_transform_inplace(view, s, True)
    assert _eq(buf[:, :, 5:29, :], want)
    assert torch.equal(buf[:, :, :5], before[:, :, :5]) and torch.equal(buf[:, :, 29:], before[:, :, 29:])
    t = torch.randn(64, 8, generator=gen).T  # last dim at stride 8
    assert _eq(OPS.hadamard_transform(t, None, False), ref.hadamard_transform_ref(t.contiguous()))
    with pytest.raises(RuntimeError, match="last dimension of x must be contiguous"):
        OPS.hadamard_transform_inplace(t, None, False)


def test_edge_values(isa):
    """Zeros, huge values (float16 overflows to inf as the twin does), NaN and inf propagate
    exactly as the twin's."""
    p = 32
    rows = torch.zeros(6, p)
    rows[1, 3] = float("nan")
    rows[2, 0] = float("inf")
    rows[3] = 6.0e4
    rows[4, ::2] = -3.0e38
    rows[5] = torch.linspace(-1, 1, p)
    for dtype in DTYPES:
        x = rows.to(dtype)
        for inverse in (False, True):
            assert _eq(OPS.hadamard_transform(x, None, inverse), ref.hadamard_transform_ref(x, None, inverse))
    assert torch.equal(OPS.hadamard_transform(torch.zeros(0, 16), None, False), torch.zeros(0, 16))


def test_fuzz_against_twin(isa):
    gen = torch.Generator().manual_seed(11)
    for _ in range(60):
        p = 2 ** int(torch.randint(0, 13, (1,), generator=gen))
        lead = [int(v) for v in torch.randint(1, 5, (int(torch.randint(0, 4, (1,), generator=gen)),),
                                                generator=gen)]
        dtype = DTYPES[int(torch.randint(0, 3, (1,), generator=gen))]
        x = _x((*lead, p), dtype, gen)
        s = _signs(p, gen) if torch.rand(1, generator=gen) < 0.5 else None
        inverse = bool(torch.rand(1, generator=gen) < 0.5)
        assert _eq(OPS.hadamard_transform(x, s, inverse), ref.hadamard_transform_ref(x, s, inverse)), \
            (lead, p, dtype, s is not None, inverse)


def _mix(m, gen, device="cpu"):
    """An orthonormal [m, m] (the Paley factor where one is built; any rotation matrix serves)."""
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    return q.to(torch.float32).contiguous().to(device)


MIXES = [(1, 1), (1, 64), (12, 1), (12, 8), (12, 32), (12, 128), (20, 16), (3, 4), (28, 64)]


@pytest.mark.parametrize("m,p", MIXES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mix_matches_twin_bitwise(device, isa, m, p, dtype):
    """With a mix (rotations of size m 2^k), functional and in place, any leading shape."""
    gen = torch.Generator().manual_seed(m * 1000 + p)
    n = m * p
    mix = _mix(m, gen, device)
    for shape in ((n,), (3, n), (2, 5, n), (1, 1, 17, n)):
        x = _x(shape, dtype, gen, device)
        s = _signs(n, gen, device)
        for signs in (None, s):
            for inverse in (False, True):
                got = OPS.hadamard_transform(x, signs, inverse, mix)
                want = ref.hadamard_transform_ref(x.cpu(), None if signs is None else signs.cpu(), inverse, mix.cpu())
                assert _eq(got.cpu(), want), (shape, dtype, signs is not None, inverse)
                y = x.clone()
                OPS.hadamard_transform_inplace(y, signs, inverse, mix)
                assert _eq(y.cpu(), want), ("inplace", shape, dtype, signs is not None, inverse)


@pytest.mark.parametrize("m,p", [(12, 1), (12, 16), (20, 4), (28, 8)])
def test_mix_twin_is_the_kronecker_matrix(m, p):
    """forward = x (M (x) H_p / sqrt(p) diag(s))^T row-wise (an independent dense oracle); the inverse
    undoes it; the mix of 1 x 1 [[1]] is the plain transform."""
    gen = torch.Generator().manual_seed(m + p)
    n = m * p
    mix = _mix(m, gen)
    s = _signs(n, gen)
    x = torch.randn(7, n, generator=gen, dtype=torch.float64)
    dense = torch.kron(mix.double(), hadamard_matrix(p)) / math.sqrt(p) * s.double()[None, :]
    got = ref.hadamard_transform_ref(x.float(), s, mix=mix)
    torch.testing.assert_close(got.double(), x @ dense.T, rtol=1e-5, atol=1e-5 * math.sqrt(n))
    back = ref.hadamard_transform_ref(got, s, inverse=True, mix=mix)
    torch.testing.assert_close(back.double(), x, rtol=1e-5, atol=1e-5)
    one = torch.ones(1, 1)
    xs = x.float()[:, :p]
    assert _eq(ref.hadamard_transform_ref(xs, s[:p], mix=one), ref.hadamard_transform_ref(xs, s[:p]))


def test_mix_fuzz_against_twin(isa):
    gen = torch.Generator().manual_seed(13)
    for _ in range(60):
        m = int(torch.randint(1, 30, (1,), generator=gen))
        p = 2 ** int(torch.randint(0, 9, (1,), generator=gen))
        lead = [int(v) for v in torch.randint(1, 5, (int(torch.randint(0, 4, (1,), generator=gen)),),
                                                generator=gen)]
        dtype = DTYPES[int(torch.randint(0, 3, (1,), generator=gen))]
        x = _x((*lead, m * p), dtype, gen)
        s = _signs(m * p, gen) if torch.rand(1, generator=gen) < 0.5 else None
        inverse = bool(torch.rand(1, generator=gen) < 0.5)
        mix = _mix(m, gen)
        if torch.rand(1, generator=gen) < 0.5:
            mix = mix.T.contiguous().T  # the same values, column-major
        assert _eq(OPS.hadamard_transform(x, s, inverse, mix), ref.hadamard_transform_ref(x, s, inverse, mix)), \
            (lead, m, p, dtype, s is not None, inverse)


def test_mix_edge_values(isa):
    """NaN, inf and values that overflow float16 propagate through the mix as through the twin."""
    m, p = 12, 16
    rows = torch.zeros(5, m * p)
    rows[1, 3] = float("nan")
    rows[2, 40] = float("inf")
    rows[3] = 6.0e4
    rows[4, ::3] = -3.0e38
    mix = _mix(m, torch.Generator().manual_seed(0))
    for dtype in DTYPES:
        x = rows.to(dtype)
        for inverse in (False, True):
            assert _eq(OPS.hadamard_transform(x, None, inverse, mix), ref.hadamard_transform_ref(x, None, inverse, mix))


def test_mix_autograd_is_the_transpose():
    gen = torch.Generator().manual_seed(6)
    m, p = 12, 8
    s = _signs(m * p, gen)
    mix = _mix(m, gen)
    x = torch.randn(3, m * p, generator=gen, requires_grad=True)
    dense = (torch.kron(mix.double(), hadamard_matrix(p)) / math.sqrt(p)).float()
    for inverse in (False, True):
        y = OPS.hadamard_transform(x, s, inverse, mix)
        g = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, g)
        rot = (s[:, None] * dense.T) if inverse else (dense * s[None, :])  # y = x @ rot^T
        torch.testing.assert_close(dx, g @ rot, rtol=1e-5, atol=1e-5)


def test_autograd_is_the_transpose():
    gen = torch.Generator().manual_seed(5)
    s = _signs(16, gen)
    x = torch.randn(3, 16, generator=gen, dtype=torch.float32, requires_grad=True)
    for inverse in (False, True):
        y = OPS.hadamard_transform(x, s, inverse)
        g = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, g)
        m = hadamard_matrix(16).float() / 4
        rot = (s[:, None] * m) if inverse else (m * s[None, :])  # y = x @ rot^T
        torch.testing.assert_close(dx, g @ rot, rtol=1e-5, atol=1e-5)


def test_opcheck(device):
    gen = torch.Generator().manual_seed(1)
    x = _x((2, 5, 64), torch.float32, gen, device)
    s = _signs(64, gen, device)
    torch.library.opcheck(OPS.hadamard_transform.default, (x, s, False))
    torch.library.opcheck(OPS.hadamard_transform.default, (x.to(torch.bfloat16), None, True))
    torch.library.opcheck(OPS.hadamard_transform_inplace.default, (x.clone(), s, True))
    mix = _mix(4, gen, device)
    torch.library.opcheck(OPS.hadamard_transform.default, (x, s, False, mix))
    torch.library.opcheck(OPS.hadamard_transform.default, (x.to(torch.float16), None, True, mix))
    torch.library.opcheck(OPS.hadamard_transform_inplace.default, (x.clone(), s, False, mix))


def test_compile_fullgraph():
    s = _signs(32, torch.Generator().manual_seed(2))

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return ops.hadamard_transform(x * 2, s, True) + 1

    x = torch.randn(4, 32)
    assert _eq(f(x), ref.hadamard_transform_ref(x * 2, s, True) + 1)
    rot = HadamardRotation(96, seed=1)  # 12 x 8: one op with a mix

    @torch.compile(fullgraph=True, backend="aot_eager")
    def g(x):
        return rot.forward(x) * 3

    x = torch.randn(5, 96)
    assert _eq(g(x), ref.hadamard_transform_ref(x, rot.signs, mix=rot.mix) * 3)


def test_rejects_bad_arguments(device):
    x = torch.randn(3, 64, device=device)
    cases = [
        (lambda: OPS.hadamard_transform(torch.randn(3, 48, device=device), None, False),
         r"last dimension of x \(48\) must be a power of two"),
        (lambda: OPS.hadamard_transform(x.double(), None, False), "must be float32, bfloat16 or float16"),
        (lambda: OPS.hadamard_transform(x.to(torch.int32), None, False), "must be float32, bfloat16 or float16"),
        (lambda: OPS.hadamard_transform(torch.tensor(1.0, device=device), None, False), "at least one dimension"),
        (lambda: OPS.hadamard_transform(x, torch.ones(32, device=device), False), "signs must be a float32 vector of 64"),
        (lambda: OPS.hadamard_transform(x, torch.ones(64, device=device, dtype=torch.float64), False),
         "signs must be a float32 vector"),
        (lambda: OPS.hadamard_transform(x, torch.ones(1, 64, device=device), False), "signs must be a float32 vector"),
        (lambda: OPS.hadamard_transform_inplace(torch.randn(2, 12, device=device), None, False),
         r"last dimension of x \(12\) must be a power of two"),
        (lambda: OPS.hadamard_transform(x, None, False, torch.eye(5, device=device)),
         r"last dimension of x \(64\) is not a multiple of mix's order \(5\)"),
        (lambda: OPS.hadamard_transform(x, None, False, torch.eye(3, 4, device=device)),
         r"mix must be a square float32 matrix"),
        (lambda: OPS.hadamard_transform(x, None, False, torch.eye(4, device=device, dtype=torch.float64)),
         r"mix must be a square float32 matrix"),
        (lambda: OPS.hadamard_transform(torch.randn(2, 96, device=device), None, False, torch.eye(4, device=device)),
         r"last dimension of x \(96\) divided by mix's order must be a power of two"),
        (lambda: OPS.hadamard_transform(torch.randn(2, 96, device=device), torch.ones(8, device=device), False,
                                        torch.eye(12, device=device)), "signs must be a float32 vector of 96"),
    ]
    if device != "cpu":
        cases.append((lambda: OPS.hadamard_transform(x, torch.ones(64), False), "signs is on cpu"))
        cases.append((lambda: OPS.hadamard_transform(x, None, False, torch.eye(4)), "mix is on cpu"))
    for fn, msg in cases:
        with pytest.raises((RuntimeError, ValueError), match=msg):
            fn()


# ------------------------------------------------------------------- rotations of any size


@pytest.mark.parametrize("n", [64, 96, 80, 576, 12])
def test_rotation_is_orthonormal_and_inverts(n):
    rot = HadamardRotation(n, seed=3)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(4, 2, n, generator=gen)
    y = rot.forward(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rot.inverse(y), x, rtol=1e-5, atol=1e-5)
    # the matrix it applies is the seeded randomized Hadamard matrix H_n diag(s) / sqrt(n)
    eye = torch.eye(n)
    dense = rot.forward(eye).T  # column j = R e_j
    torch.testing.assert_close(dense @ dense.T, eye, rtol=1e-5, atol=1e-5)
    h = hadamard_matrix(n).float() / math.sqrt(n)
    torch.testing.assert_close(dense, h * rot.signs[None, :], rtol=1e-5, atol=1e-5)
    z = y.clone()
    assert rot.inverse_(z) is z
    torch.testing.assert_close(z, x, rtol=1e-5, atol=1e-5)


def test_rotation_bad_sizes():
    with pytest.raises(ValueError, match="no Hadamard rotation of size 9"):
        HadamardRotation(9)
    with pytest.raises(ValueError, match="size 64 applied to a last dimension of 32"):
        HadamardRotation(64).forward(torch.randn(2, 32))
