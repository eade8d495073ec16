"""The CUDA implementation of hfquant::qembedding (hfquant/formats/cuda_rows.py) is written in
torch ops, so it runs on any device: here on the CPU over the CUDA layout that ref.py's
repack twin writes, against the twin and against formats.dequantize of the checkpoint tensors."""
from __future__ import annotations

import pytest
import torch

from hfquant import formats, ref
from hfquant.formats.cuda_rows import decode_rows

SHAPES = [(1, 1), (5, 96), (70, 200), (64, 128), (3, 300), (129, 17)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("N,K", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_rows_match_the_twin_and_the_checkpoint(bits, symmetric, group_size, N, K):
    g = torch.Generator().manual_seed(N * 1000 + K + bits)
    w = torch.randn(N, K, generator=g) * torch.logspace(-3, 1, K)
    q = formats.quantize_rtn(w, bits, group_size, symmetric)
    pw, ps = ref.repack_cuda_ref(q.qweight, q.scales, q.zeros, bits, group_size, K)
    full = formats.dequantize(q.qweight, q.scales, q.zeros, bits, group_size, K).float()
    for ids in (torch.randint(0, N, (2, 3), generator=g), torch.tensor([N - 1, 0, N - 1], dtype=torch.int32),
                torch.zeros(0, dtype=torch.int64)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = decode_rows(ids, pw, ps, bits, group_size, N, K, dtype)
            assert got.dtype == dtype and got.shape == (*ids.shape, K)
            assert torch.equal(got, ref.qembedding_ref(ids, pw, ps, bits, group_size, N, K, dtype))
            assert torch.equal(got, full[ids.long()].to(dtype))


def test_arguments_are_checked():
    q = formats.quantize_rtn(torch.randn(8, 64), 4, 32, True)
    pw, ps = ref.repack_cuda_ref(q.qweight, q.scales, q.zeros, 4, 32, 64)
    ids = torch.tensor([1])
    cases = [
        (dict(ids=ids.float()), r"ids must be int64 or int32, got torch.float32"),
        (dict(ids=torch.tensor([8])), r"id 8 is out of range for 8 rows"),
        (dict(ids=torch.tensor([-1])), r"id -1 is out of range for 8 rows"),
        (dict(bits=3), r"bits must be 4 or 8, got 3"),
        (dict(packed_weight=pw.to(torch.int8)), r"packed_weight must be uint8 \[Np, bytes\]"),
        (dict(in_features=200), r"packed_weight \[64, 64\] cannot hold a 8 x 200 4-bit weight in the CUDA layout"),
        (dict(packed_scales=ps[:1, :, :8]), r"packed_scales must be float32 \[2, 1 or 2, 64\]"),
        (dict(group_size=64), r"packed_scales must be float32 \[1, 1 or 2, 64\], got torch.float32 \[2, 1, 64\]"),
    ]
    for change, msg in cases:
        args = dict(ids=ids, packed_weight=pw, packed_scales=ps, bits=4, group_size=32, out_features=8,
                    in_features=64, dtype=torch.float32)
        args.update(change)
        with pytest.raises(ValueError, match=r"hfquant::qembedding: " + msg):
            decode_rows(**args)
