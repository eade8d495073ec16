"""The packed layouts of GPTQ, AWQ and compressed-tensors, against hand-built words and
against the compressed-tensors library's own packer."""
import pytest
import torch

from hfquant.interop import layouts


def test_gptq_qweight_packs_along_k_least_significant_first():
    # one output column, in_features 8: codes 1..8 -> one word 0x87654321
    codes = torch.arange(1, 9, dtype=torch.int32)[None, :]
    q = layouts.gptq_pack_qweight(codes, 4)
    assert q.shape == (1, 1) and q.dtype == torch.int32
    assert q.item() == 0x87654321 - 2**32
    # 8-bit: four codes per word
    c8 = torch.tensor([[0x11, 0x22, 0x33, 0x44]], dtype=torch.int32)
    assert layouts.gptq_pack_qweight(c8, 8).item() == 0x44332211


def test_gptq_qzeros_store_zero_minus_one():
    zeros = torch.full((8, 1), 8, dtype=torch.int32)  # symmetric 4-bit: zero 8 -> 7 in every nibble
    assert layouts.gptq_pack_qzeros(zeros, 4).item() == 0x77777777
    assert layouts.gptq_pack_qzeros(zeros, 4, v1=False).item() == 0x88888888 - 2**32
    with pytest.raises(ValueError, match="zero point 0"):
        layouts.gptq_pack_qzeros(torch.zeros(8, 1, dtype=torch.int32), 4)


def test_awq_interleave_order():
    # eight output columns of one input row; codes = column index: AWQ stores columns
    # 0, 2, 4, 6, 1, 3, 5, 7 in nibbles 0..7
    codes = torch.arange(8, dtype=torch.int32)[:, None]  # [N=8, K=1]
    q = layouts.awq_pack_qweight(codes)
    assert q.shape == (1, 1)
    nibbles = [(q.item() >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("bits", [4, 8])
def test_round_trips(bits):
    g = torch.Generator().manual_seed(0)
    N, K, G = 24, 64, 2
    codes = torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 1 << bits, (N, G), generator=g, dtype=torch.int32)
    assert torch.equal(layouts.gptq_unpack_qweight(layouts.gptq_pack_qweight(codes, bits), bits), codes)
    assert torch.equal(layouts.gptq_unpack_qzeros(layouts.gptq_pack_qzeros(zeros, bits), bits, N), zeros)
    assert torch.equal(layouts.ct_unpack(layouts.ct_pack(codes, bits), bits, K), codes)
    if bits == 4:
        assert torch.equal(layouts.awq_unpack_qweight(layouts.awq_pack_qweight(codes)), codes)
        assert torch.equal(layouts.awq_unpack_qzeros(layouts.awq_pack_qzeros(zeros), N), zeros)


@pytest.mark.parametrize("bits,K", [(4, 64), (4, 72), (8, 60)])
def test_compressed_tensors_packing_matches_the_library(bits, K):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(1)
    N = 16
    half = 1 << (bits - 1)
    signed = torch.randint(-half, half, (N, K), generator=g, dtype=torch.int8)
    ours = layouts.ct_pack(signed.to(torch.int32) + half, bits)
    assert torch.equal(ours, ct.pack_to_int32(signed, bits))
    # zero points are packed along the output dimension
    zp = torch.randint(-half, half, (N, 3), generator=g, dtype=torch.int8)
    ours_zp = layouts.ct_pack(zp.to(torch.int32).t().contiguous() + half, bits).t()
    assert torch.equal(ours_zp, ct.pack_to_int32(zp, bits, packed_dim=0))
    assert torch.equal(ct.unpack_from_int32(ours, bits, torch.Size([N, K])), signed)


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        layouts.gptq_pack_qweight(torch.zeros(4, 12, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="int32"):
        layouts.gptq_unpack_qweight(torch.zeros(4, 4, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="4- and 8-bit"):
        layouts.ct_pack(torch.zeros(4, 12, dtype=torch.int32), 3)
