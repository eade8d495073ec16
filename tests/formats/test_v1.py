"""Format v1: exact round trips and the quantization grid."""
import pytest
import torch

from hfquant import formats
from hfquant import ref
from hfquant.ref import qweight_from_packed

SHAPES = [(1, 1), (3, 17), (17, 64), (37, 300), (64, 576)]
SCHEMES = [(4, -1, True), (4, 32, True), (4, 128, False), (4, 64, False), (8, -1, True), (8, 128, False),
           (8, 32, True), (3, 128, True), (3, -1, False), (3, 32, False), (2, 64, True), (2, 128, False),
           (2, -1, False)]


def _id(s):
    return f"w{s[0]}g{s[1]}{'s' if s[2] else 'a'}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_int4_pack_roundtrip(shape):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=g)
    packed = formats.pack_int4(codes)
    assert packed.shape == (shape[0], (shape[1] + 1) // 2)
    assert torch.equal(formats.unpack_int4(packed, shape[1]), codes)
    # element k lives in byte k//2, low nibble for even k
    assert int(packed[0, 0]) & 0x0F == int(codes[0, 0])


@pytest.mark.parametrize("scheme", SCHEMES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quantize_dequantize_error_bound(shape, scheme):
    bits, gs, sym = scheme
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g)
    q = formats.quantize_rtn(w, bits, gs, sym)
    wd = formats.dequantize(q.qweight, q.scales, q.zeros, bits, gs, shape[1], torch.float32)
    # RTN error is at most half a step (plus the clamped top code of symmetric 4-bit)
    G = q.scales.shape[1]
    gl = shape[1] if gs == -1 else gs
    step = q.scales.float().repeat_interleave(gl, dim=1)[:, : shape[1]]
    assert ((wd - w).abs() <= step * 0.5 + 1e-6).all()
    assert G == (1 if gs == -1 else -(-shape[1] // gs))


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s[0] >= 4], ids=_id)
def test_kernel_layout_roundtrip_exact(scheme):
    bits, gs, sym = scheme
    w = torch.randn(37, 300, generator=torch.Generator().manual_seed(2))
    q = formats.quantize_rtn(w, bits, gs, sym)
    pw, _ = ref.repack_ref(q.qweight, q.scales, q.zeros, bits, gs, 300)
    assert torch.equal(qweight_from_packed(pw, bits, 37, 300, sym), q.qweight)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bit_stream_roundtrip(shape, bits):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 1 << bits, shape, generator=g)
    packed = formats.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], -(-shape[1] * bits // 8))
    assert torch.equal(formats.unpack_bits(packed, bits, shape[1]), codes)
    # code k occupies stream bits [bits*k, bits*k + bits), stream bit j = bit j%8 of byte j//8
    row = packed[0].tolist()
    for k in range(shape[1]):
        v = sum(((row[(bits * k + i) // 8] >> ((bits * k + i) % 8)) & 1) << i for i in range(bits))
        assert v == int(codes[0, k])
    if bits == 4:  # the 4-bit stream is the nibble layout
        assert torch.equal(packed, formats.pack_int4(codes.to(torch.uint8)))


@pytest.mark.parametrize("bits,sym", [(2, True), (3, True), (2, False), (3, False)])
def test_low_bit_grid(bits, sym):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(4))
    q = formats.quantize_rtn(w, bits, 128, sym)
    codes, z = formats.codes_and_zeros(q.qweight, q.zeros, bits, 256)
    z = z.repeat_interleave(128, dim=1) if z.shape[1] == 2 else z
    assert int(codes.min()) >= 0 and int(codes.max()) <= (1 << bits) - 1
    if sym:
        # symmetric: values -2^(b-1) .. 2^(b-1) - 1 around the implicit zero h = 2^(b-1); the
        # lowest is used at least where the group's negative extreme sets the step
        # (-min / h > max / (h - 1)); elsewhere only where the minimum rounds to it
        h = 1 << (bits - 1)
        assert (z == h).all()
        g = w.reshape(16, 2, 128)
        neg_first = -g.amin(-1) / h > g.amax(-1) / (h - 1)
        cmin = codes.reshape(16, 2, 128).amin(-1)
        assert (cmin[neg_first] == 0).all()
        # a group led by its negative extreme: that weight is exact at the lowest code
        wn = torch.linspace(-0.5, 0.5, 128).repeat(2, 1)
        wn[:, 7] = -2.0
        qn = formats.quantize_rtn(wn, bits, 128, sym)
        cn, _ = formats.codes_and_zeros(qn.qweight, qn.zeros, bits, 128)
        assert (cn[:, 7] == 0).all()
        assert torch.allclose(qn.scales.float(), torch.full((2, 1), 2.0 / h))


def test_low_bit_validate_rejects_padding_and_zeros():
    w = torch.randn(4, 13, generator=torch.Generator().manual_seed(5))
    q = formats.quantize_rtn(w, 3, -1, False)
    formats.validate("m", q.qweight, q.scales, q.zeros, 3, -1, 13, 4, False)
    bad = q.qweight.clone()
    bad[:, -1] |= 0x80  # 13 * 3 = 39 bits: bit 7 of byte 4 is padding
    with pytest.raises(ValueError, match="padding bits"):
        formats.validate("m", bad, q.scales, q.zeros, 3, -1, 13, 4, False)
    with pytest.raises(ValueError, match="above 7"):
        formats.validate("m", q.qweight, q.scales, torch.full_like(q.zeros, 8), 3, -1, 13, 4, False)
    with pytest.raises(ValueError, match=r"m\.qweight has shape"):
        formats.validate("m", q.qweight[:, :-1], q.scales, q.zeros, 3, -1, 13, 4, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scales_keep_model_dtype(dtype):
    w = torch.randn(8, 64).to(dtype)
    q = formats.quantize_rtn(w, 4, 32, True)
    assert q.scales.dtype == dtype


def test_zero_and_constant_rows():
    w = torch.zeros(4, 64)
    w[1] = 3.0
    for bits, gs, sym in SCHEMES:
        q = formats.quantize_rtn(w, bits, gs, sym)
        wd = formats.dequantize(q.qweight, q.scales, q.zeros, bits, gs, 64, torch.float32)
        assert torch.allclose(wd, w, atol=1e-6), (bits, gs, sym)


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        formats.quantize_rtn(torch.randn(3), 4, 32, True)
    with pytest.raises(ValueError, match="floating point"):
        formats.quantize_rtn(torch.ones(3, 32, dtype=torch.int32), 4, 32, True)
    w = torch.randn(3, 32)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        formats.quantize_rtn(w, 4, 32, True)
