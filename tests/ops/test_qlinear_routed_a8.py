"""hfquant::qlinear_routed_a8 (4-bit routed experts with int8 activations, CPU) against its
twin in hfquant/ref.py and, bit for bit, against hfquant::qlinear_a8 on each row alone with its
expert's weights, on every int8 kernel path (`i8path`: AVX-512 VNNI, AVX2, portable). The
routings of test_qlinear_routed: R = 0 and 1, decode, random, every row on one expert, and a mix
of 1, few and many rows (the kernels run rows in blocks, so experts of 1, 3, 40 and 150 rows
exercise full blocks and remainders)."""
from __future__ import annotations

import pytest
import torch

import hfquant
import hfquant.ops  # noqa: F401  (registers the fake kernels)
from _utils import assert_close
from hfquant import ops, ref
from test_qlinear_routed import DTYPES, GROUP_SIZES, SHAPES, _name, experts, routings, step_scale

OPS = torch.ops.hfquant


def per_row_a8(x, w, sb, ids, bias, group_size, N, K):
    """hfquant::qlinear_a8 on each row alone with its expert's weights."""
    rows = [OPS.qlinear_a8(x[r:r + 1], w[e], sb[e], None if bias is None else bias[e], 4, group_size, N, K)
            for r, e in enumerate(ids.tolist())]
    return torch.cat(rows) if rows else x.new_empty((0, N))


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
def test_routed_a8_matches_ref_and_rows_alone(i8path, group_size, dtype):
    gen = torch.Generator().manual_seed(21)
    for i, (N, K, E) in enumerate(SHAPES):
        asym = i % 2 == 0
        w, sb, _, _ = experts("cpu", E, N, K, 4, group_size, asym, gen)
        for j, ids in enumerate(routings(E, gen)):
            x = (torch.randn(len(ids), K, generator=gen) * 2).to(dtype)
            bias = torch.randn(E, N, generator=gen).to(dtype if j % 2 else torch.float32) if j % 3 else None
            y = OPS.qlinear_routed_a8(x, w, sb, ids, bias, 4, group_size, N, K)
            assert y.dtype == dtype and y.shape == (len(ids), N)
            msg = f"{i8path} N={N} K={K} E={E} routing {j}"
            assert torch.equal(y, per_row_a8(x, w, sb, ids, bias, group_size, N, K)), msg
            if len(ids):
                want = ref.qlinear_routed_a8_ref(x.double() if dtype == torch.float32 else x, w, sb, ids,
                                                 None if bias is None else bias.double(), 4, group_size, N, K)
                xq = ref.quantize_act_blocks_ref(x)[0]
                assert_close(y, want.double(), dtype, msg, scale=step_scale(xq, sb, ids, group_size, N, K))


def test_routed_a8_edges_and_fuzz(i8path):
    """Strided x, int32 ids, NaN in one row (its outputs NaN, the others finite), NaN scales of
    experts no row selects (never read), and random sizes."""
    gen = torch.Generator().manual_seed(22)
    N, K, E = 24, 200, 5
    w, sb, _, _ = experts("cpu", E, N, K, 4, 64, True, gen)
    sb = sb.clone()
    sb[[0, 4]] = float("nan")
    ids = torch.tensor([1, 3, 3, 2, 1, 1, 2], dtype=torch.int32)
    x = torch.randn(K, len(ids), generator=gen).T  # strided rows
    x[2, 7] = float("nan")
    y = OPS.qlinear_routed_a8(x, w, sb, ids, None, 4, 64, N, K)
    assert y[2].isnan().all() and torch.isfinite(y[[0, 1, 3, 4, 5, 6]]).all()
    assert torch.equal(y.nan_to_num(7.0), per_row_a8(x, w, sb, ids.long(), None, 64, N, K).nan_to_num(7.0))
    for _ in range(12):
        gs = [32, 64, 128, -1][int(torch.randint(0, 4, (1,), generator=gen))]
        N, K, E = (int(v) for v in torch.randint(1, 200, (3,), generator=gen) % torch.tensor([200, 200, 9]) + 1)
        w, sb, _, _ = experts("cpu", E, N, K, 4, gs, bool(torch.rand(1, generator=gen) < 0.5), gen)
        R = int(torch.randint(0, 40, (1,), generator=gen))
        ids = torch.randint(0, E, (R,), generator=gen)
        x = torch.randn(R, K, generator=gen) * float(torch.rand(1, generator=gen) * 10)
        assert torch.equal(OPS.qlinear_routed_a8(x, w, sb, ids, None, 4, gs, N, K),
                           per_row_a8(x, w, sb, ids, None, gs, N, K)), f"fuzz N={N} K={K} E={E} gs={gs} R={R}"


def test_routed_a8_opcheck_ref_backend_and_errors():
    gen = torch.Generator().manual_seed(23)
    N, K, E = 17, 300, 3
    w, sb, _, _ = experts("cpu", E, N, K, 4, 128, False, gen)
    cases = ((torch.randn(5, K, generator=gen), torch.tensor([2, 0, 2, 2, 1]), torch.randn(E, N, generator=gen)),
             (torch.randn(1, K, generator=gen).to(torch.bfloat16), torch.tensor([1], dtype=torch.int32), None),
             (torch.randn(0, K, generator=gen), torch.zeros(0, dtype=torch.long), None))
    for x, ids, bias in cases:
        torch.library.opcheck(OPS.qlinear_routed_a8.default, (x, w, sb, ids, bias, 4, 128, N, K))
    x, ids = cases[0][0], cases[0][1]
    with hfquant.settings(backend="ref"):
        r = ops.qlinear_routed_a8(x, w, sb, ids, None, 4, 128, N, K)
    assert torch.equal(r, ref.qlinear_routed_a8_ref(x, w, sb, ids, None, 4, 128, N, K))
    w8, sb8, _, _ = experts("cpu", E, N, K, 8, 128, False, gen)
    for args, err, match in [
            ((x, w8, sb8, ids, None, 8, 128, N, K), RuntimeError, r"hfquant::qlinear_routed_a8: bits=8 is not "
                                                                  r"supported \(4-bit experts only"),
            ((x, w, sb, torch.tensor([0, 3, 0, 0, 0]), None, 4, 128, N, K), RuntimeError,
             r"hfquant::qlinear_routed_a8: expert id 3 at row 1 is out of range for 3 experts"),
            ((x[:, :299], w, sb, ids, None, 4, 128, N, K), RuntimeError,
             r"hfquant::qlinear_routed_a8: x has shape \[5, 299\], expected \[rows, in_features=300\]"),
            ((x, w, sb[:2].contiguous(), ids, None, 4, 128, N, K), RuntimeError,
             r"packed_weight holds 3 experts but packed_scales holds 2")]:
        with pytest.raises(err, match=match):
            OPS.qlinear_routed_a8(*args)
    with hfquant.settings(backend="ref"), pytest.raises(ValueError, match="bits=8 is not supported"):
        ops.qlinear_routed_a8(x, w8, sb8, ids, None, 8, 128, N, K)
