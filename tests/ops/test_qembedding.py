"""hfquant::qembedding (row lookup from the qlinear kernel layout) against its twin in ref.py."""
import itertools

import pytest
import torch

from hfquant import formats, ops, ref

SHAPES = [(1, 1), (5, 33), (17, 64), (63, 300), (130, 576)]  # (rows N, dim K)
SCHEMES = list(itertools.product((4, 8), (-1, 32, 128), (True, False)))


def _packed(N, K, bits, gs, sym, seed=0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    q = formats.quantize_rtn(w, bits, gs, sym)
    pw, ps = ops.repack(q.qweight, q.scales, q.zeros, bits, gs, K)
    return q, pw, ps


@pytest.mark.parametrize("bits,gs,sym", SCHEMES, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_qembedding_matches_ref_and_dequantized_rows(shape, bits, gs, sym):
    N, K = shape
    q, pw, ps = _packed(N, K, bits, gs, sym)
    full = formats.dequantize(q.qweight, q.scales, q.zeros, bits, gs, K, torch.float32)
    g = torch.Generator().manual_seed(1)
    for ids_shape in [(), (1,), (3, 7), (2, 1, 5)]:
        ids = torch.randint(0, N, ids_shape, generator=g)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = ops.qembedding(ids, pw, ps, bits, gs, N, K, dtype)
            want = ref.qembedding_ref(ids, pw, ps, bits, gs, N, K, dtype)
            assert out.dtype == dtype and out.shape == (*ids_shape, K)
            # (v - z) * s in fp32, then one rounding to dtype: exactly the rows the checkpoint
            # tensors stand for
            assert torch.equal(out, want)
            assert torch.equal(out, full[ids].to(dtype))


def test_qembedding_int32_ids_edge_rows_and_empty():
    N, K = 37, 96
    _, pw, ps = _packed(N, K, 4, 32, False)
    ids = torch.tensor([[0, N - 1, 3, N - 1]], dtype=torch.int32)
    assert torch.equal(ops.qembedding(ids, pw, ps, 4, 32, N, K, torch.float32),
                       ref.qembedding_ref(ids.long(), pw, ps, 4, 32, N, K, torch.float32))
    empty = ops.qembedding(torch.zeros(0, 3, dtype=torch.long), pw, ps, 4, 32, N, K, torch.float32)
    assert empty.shape == (0, 3, K)


def test_qembedding_extreme_scales():
    # rows of zeros (scale 0) and of large values decode exactly like the reference
    w = torch.zeros(8, 64)
    w[1] = 3e4
    w[2, ::2] = -1e-30
    q = formats.quantize_rtn(w, 8, -1, True)
    pw, ps = ops.repack(q.qweight, q.scales, q.zeros, 8, -1, 64)
    ids = torch.arange(8)
    out = ops.qembedding(ids, pw, ps, 8, -1, 8, 64, torch.float32)
    assert torch.equal(out, ref.qembedding_ref(ids, pw, ps, 8, -1, 8, 64, torch.float32))
    assert torch.equal(out[0], torch.zeros(64)) and torch.isfinite(out).all()


@pytest.mark.parametrize("case,match", [
    ("id_high", "id 37 at position 1 is out of range for 37 rows"),
    ("id_negative", "id -1 at position 0 is out of range"),
    ("float_ids", "ids must be int64 or int32"),
    ("bad_dtype", "dtype must be float32, bfloat16 or float16"),
    ("bad_bits", "bits=3 is not supported"),
    ("bad_group", "group_size=48"),
    ("wrong_layout", "packed_weight has shape"),
    ("wrong_scales", "packed_scales has shape"),
])
def test_qembedding_rejects(case, match):
    N, K = 37, 96
    _, pw, ps = _packed(N, K, 4, 32, True)
    args = dict(ids=torch.tensor([0, 1]), pw=pw, ps=ps, bits=4, gs=32, N=N, K=K, dtype=torch.float32)
    args.update({"id_high": dict(ids=torch.tensor([0, 37])), "id_negative": dict(ids=torch.tensor([-1])),
                 "float_ids": dict(ids=torch.tensor([0.0])), "bad_dtype": dict(dtype=torch.int32),
                 "bad_bits": dict(bits=3), "bad_group": dict(gs=48), "wrong_layout": dict(K=200),
                 "wrong_scales": dict(gs=64)}[case])
    with pytest.raises(RuntimeError, match=match):
        torch.ops.hfquant.qembedding(args["ids"], args["pw"], args["ps"], args["bits"], args["gs"], args["N"],
                                     args["K"], args["dtype"])


@pytest.mark.parametrize("bits,gs", [(4, 128), (8, -1)])
def test_qembedding_opcheck(bits, gs):
    N, K = 20, 160
    _, pw, ps = _packed(N, K, bits, gs, False)
    ids = torch.randint(0, N, (2, 5))
    torch.library.opcheck(torch.ops.hfquant.qembedding.default, (ids, pw, ps, bits, gs, N, K, torch.bfloat16))
