"""The quantized KV-cache ops (kv_quantize, kv_append, kv_dequantize) against their pure-torch
twins in hfquant/ref.py, on every device (`device`: the CPU, and CUDA where present) and every
kernel path this CPU can run.

Unlike the matmul ops these are pure element-wise arithmetic done in the twin's order
(fp32 min/max, one division, round-half-even, c * scale + min with fp contraction off),
so everything must match BITWISE: the packed codes, the fp16 scales/mins and the
dequantized states in float32, bfloat16 and float16, with NaN exactly where the twin has
NaN, on CUDA too (explicitly rounded fp32 steps, no FMA). On the CPU the quantizer has a
single (scalar) implementation; the dequantizer has per-ISA clones, which is what the `isa`
fixture exercises.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import hfquant.ops  # noqa: F401  (registers the fake kernels)
from hfquant import ref

OPS = torch.ops.hfquant
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (bits, group_size, per_channel): every bit width with every group size, both schemes
SCHEMES = list(itertools.product((2, 4, 8), (16, 32, 64, 128), (True, False)))


def _scheme_id(s):
    bits, g, pc = s
    return f"b{bits}-g{g}-{'key' if pc else 'val'}"


def _eq(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values (NaN where the other has NaN), same dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _assert_eq(a, b, what):
    assert _eq(a, b), (f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}, "
                       f"{(a != b).sum().item() if a.shape == b.shape else '?'} elements differ")


def _assert_quant_eq(got, want, what):
    for name, a, b in zip(("codes", "scales", "mins"), got, want):
        _assert_eq(a, b, f"{what} {name}")


def _shapes(bits, g, pc):
    """[B, H, T, D] shapes for a scheme: D in {32, 64, 128} (g | D for values), B and H
    cycling through 1..3; T a multiple of g for keys, odd (1, 7, 129) for values."""
    out = []
    Ds = [D for D in (32, 64, 128) if pc or D % g == 0]
    for i, D in enumerate(Ds):
        B, H = 1 + (i + bits) % 3, 1 + (i + g // 16) % 3
        T = g * (1 + (i + bits) % 3) if pc else (1, 7, 129)[(i + bits // 2) % 3]
        out.append((B, H, T, D))
    if not pc:  # make sure every scheme sees all three odd lengths
        seen = {s[2] for s in out}
        out += [(2, 1, T, Ds[-1]) for T in (1, 7, 129) if T not in seen]
    # and every D with 1, 2 or 3 groups of tokens (keys) / with each odd length (values)
    for i, D in enumerate(Ds):
        B, H = 1 + (i + bits) % 3, 1 + (i + g // 16) % 3
        for T in (g * (1 + i % 3),) if pc else (1, 7, 129):
            if (B, H, T, D) not in out:
                out.append((B, H, T, D))
    return out


def _states(shape, dtype, gen, scale=1.0):
    """Random states with a per-(batch, head) spread and offset, like real keys/values;
    |x| stays below about 3 * scale (kept inside the float16 range for scale 1e4)."""
    *lead, T, D = shape
    spread = torch.rand(*lead, 1, 1, generator=gen) * 0.9 + 0.1
    shift = torch.randn(*lead, 1, D, generator=gen).clamp(-1, 1)
    x = torch.randn(*shape, generator=gen).clamp(-4, 4) * spread * 0.5 + shift
    return (x * scale).to(dtype)


# ---------------------------------------------------------------------------- kv_quantize


@pytest.mark.parametrize("scheme", SCHEMES, ids=_scheme_id)
def test_kv_quantize_matches_ref(device, isa, scheme):
    bits, g, pc = scheme
    gen = torch.Generator().manual_seed(bits * 1000 + g * 2 + pc)
    for shape in _shapes(bits, g, pc):
        for dtype in DTYPES:
            x = _states(shape, dtype, gen)
            got = OPS.kv_quantize(x.to(device), bits, g, pc)
            want = ref.kv_quantize_ref(x, bits, g, pc)
            *lead, T, D = shape
            P, G = (T // g, D) if pc else (T, D // g)
            assert all(t.device.type == device for t in got)
            assert got[0].shape == (*lead, T, D * bits // 8) and got[0].dtype == torch.uint8
            assert got[1].shape == got[2].shape == (*lead, P, G)
            assert got[1].dtype == got[2].dtype == torch.float16
            _assert_quant_eq([t.cpu() for t in got], want, f"{shape} {dtype}")


@pytest.mark.parametrize("bits,g,pc", [(4, 32, True), (2, 16, False), (8, 64, True), (4, 32, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_quantize_2d_3d_and_noncontiguous(bits, g, pc, dtype):
    gen = torch.Generator().manual_seed(bits + g)
    T = 2 * g if pc else 7
    cases = {
        "2d": _states((T, 64), dtype, gen),
        "3d": _states((3, T, 128), dtype, gen),
        # [B, H, D, T] storage seen as [B, H, T, D]
        "transposed_td": _states((2, 3, 64, T), dtype, gen).transpose(-2, -1),
        # transformers' [B, T, H, D] projection seen as [B, H, T, D]
        "transposed_th": _states((2, T, 3, 32), dtype, gen).transpose(1, 2),
        # a slice of the tokens (strided on the batch/head dims)
        "token_slice": _states((2, 2, T + g, 64), dtype, gen)[..., g:, :],
    }
    for name, x in cases.items():
        got = OPS.kv_quantize(x, bits, g, pc)
        _assert_quant_eq(got, ref.kv_quantize_ref(x, bits, g, pc), name)
        _assert_quant_eq(got, OPS.kv_quantize(x.contiguous(), bits, g, pc), f"{name} vs contiguous")


# -------------------------------------------------------------------------- kv_dequantize


@pytest.mark.parametrize("scheme", SCHEMES, ids=_scheme_id)
def test_kv_dequantize_matches_ref(device, isa, scheme):
    bits, g, pc = scheme
    gen = torch.Generator().manual_seed(bits * 7 + g + pc)
    for shape, xdtype in itertools.product(_shapes(bits, g, pc), DTYPES):
        *lead, T, D = shape
        x = _states(shape, xdtype, gen)
        c, s, m = OPS.kv_quantize(x.to(device), bits, g, pc)  # the device's own codes
        cc, sc, mc = c.cpu(), s.cpu(), m.cpu()
        # all tokens, a partial group (keys) / a prefix (values), half (whole groups for keys;
        # none for a single group or token), one token
        half = T // 2 // g * g if pc else T // 2
        lengths = sorted({T, max(1, T - g // 2 - 1), max(1, T // 2 + 1), half, 1})
        for dtype, length in itertools.product(DTYPES, lengths):
            want = ref.kv_dequantize_ref(cc, sc, mc, length, bits, g, pc, dtype)
            y = OPS.kv_dequantize(c, s, m, length, bits, g, pc, dtype)
            assert y.device.type == device
            assert y.shape == (*lead, length, D) and y.dtype == dtype and y.is_contiguous()
            _assert_eq(y.cpu(), want, f"{shape} {xdtype} length={length} {dtype}")
        # into the start of a larger buffer: the rest stays as it was
        for dtype, length in itertools.product(DTYPES, sorted({max(1, T - 3), T, half})):
            out = torch.full((*lead, T + 5, D), -7.0, dtype=dtype, device=device)
            assert OPS.kv_dequantize_into(c, s, m, out, length, bits, g, pc) is None
            _assert_eq(out[..., :length, :].cpu(), ref.kv_dequantize_ref(cc, sc, mc, length, bits, g, pc, dtype),
                       f"{shape} {xdtype} out= {dtype} length={length}")
            assert (out[..., length:, :] == -7.0).all(), "kv_dequantize wrote past length"
            want = torch.full((*lead, T + 5, D), -7.0, dtype=dtype)
            ref.kv_dequantize_into_ref(cc, sc, mc, want, length, bits, g, pc)
            _assert_eq(out.cpu(), want, f"{shape} {xdtype} out= vs twin's out= length={length}")


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if not s[2]], ids=_scheme_id)
def test_kv_dequantize_rotated_into_matches_ref(device, isa, scheme):
    """The fused dequantize + inverse Walsh-Hadamard transform (the rotated cache's read) is the
    twin's dequantize followed by hadamard_transform(..., inverse=True), bit for bit, and only
    the first `length` tokens are written."""
    bits, g, _ = scheme
    gen = torch.Generator().manual_seed(bits * 11 + g)
    for D in (d for d in (32, 64, 128) if d % g == 0):
        signs = (torch.randint(0, 2, (D,), generator=gen) * 2 - 1).float()
        for T, xdtype in itertools.product((1, 7, 129), DTYPES):
            shape = (1 + T % 2, 2, T, D)
            c, s, m = OPS.kv_quantize(_states(shape, xdtype, gen).to(device), bits, g, False)
            for dtype, length in itertools.product(DTYPES, sorted({T, max(1, T // 2)})):
                out = torch.full((*shape[:2], T + 3, D), -7.0, dtype=dtype, device=device)
                OPS.kv_dequantize_rotated_into(c, s, m, out, length, bits, g, signs.to(device))
                want = torch.full((*shape[:2], T + 3, D), -7.0, dtype=dtype)
                ref.kv_dequantize_rotated_into_ref(c.cpu(), s.cpu(), m.cpu(), want, length, bits, g, signs)
                _assert_eq(out.cpu(), want, f"{shape} {xdtype} -> {dtype} length={length}")
                plain = ref.kv_dequantize_ref(c.cpu(), s.cpu(), m.cpu(), length, bits, g, False, dtype)
                _assert_eq(want[..., :length, :], ref.hadamard_transform_ref(plain, signs, inverse=True), "twin")


def test_kv_dequantize_rotated_into_opcheck_and_errors(device):
    x = torch.randn(1, 2, 32, 64, device=device)
    c, s, m = OPS.kv_quantize(x, 4, 32, False)
    signs = torch.ones(64, device=device)
    torch.library.opcheck(OPS.kv_dequantize_rotated_into.default, (c, s, m, torch.zeros(1, 2, 40, 64, device=device),
                                                                   30, 4, 32, signs))
    out = torch.zeros(1, 2, 32, 64, device=device)
    with pytest.raises((RuntimeError, ValueError), match="signs must be a"):
        OPS.kv_dequantize_rotated_into(c, s, m, out, 32, 4, 32, torch.ones(32, device=device))
    c48, s48, m48 = OPS.kv_quantize(torch.randn(1, 2, 8, 48, device=device), 4, 16, False)
    with pytest.raises((RuntimeError, ValueError), match="(head_dim=48 is not a power of two)|(last dimension of x \\(48\\))"):
        OPS.kv_dequantize_rotated_into(c48, s48, m48, torch.zeros(1, 2, 8, 48, device=device), 8, 4, 16,
                                       torch.ones(48, device=device))
    with pytest.raises(RuntimeError, match="length=40 is outside"):
        OPS.kv_dequantize_rotated_into(c, s, m, out, 40, 4, 32, signs)


@pytest.mark.parametrize("pc", [True, False], ids=["key", "val"])
def test_kv_dequantize_length_zero(pc):
    x = torch.randn(2, 3, 64, 64)
    c, s, m = OPS.kv_quantize(x, 4, 32, pc)
    y = OPS.kv_dequantize(c, s, m, 0, 4, 32, pc, torch.float16)
    assert y.shape == (2, 3, 0, 64) and y.dtype == torch.float16
    out = torch.full((2, 3, 10, 64), 3.0)
    OPS.kv_dequantize_into(c, s, m, out, 0, 4, 32, pc)
    assert (out == 3.0).all()


def test_kv_dequantize_ref_length_zero():
    x = torch.randn(2, 3, 64, 64)
    c, s, m = OPS.kv_quantize(x, 4, 32, False)
    want = ref.kv_dequantize_ref(c, s, m, 0, 4, 32, False, torch.float16)
    _assert_eq(OPS.kv_dequantize(c, s, m, 0, 4, 32, False, torch.float16), want, "length 0")


def _roundtrip_bound(x32, s, m, bits, g, pc):
    """Element-wise bound on |x - dequant(quant(x))| in exact arithmetic: half a step of the
    stored scale, plus what the clamp can cut off because min and scale were rounded to fp16
    (min above the true minimum, qmax * scale below the true range)."""
    qmax = (1 << bits) - 1
    *lead, T, D = x32.shape
    if pc:
        grp, red = x32.reshape(*lead, T // g, g, D), -2
    else:
        grp, red = x32.reshape(*lead, T, D // g, g), -1
    lo, hi = grp.amin(red), grp.amax(red)
    s32, m32 = s.float(), m.float()
    cut = (lo - m32).abs() + qmax * ((hi - lo) / qmax - s32).abs()
    bound = (s32 / 2 + cut).unsqueeze(red).expand_as(grp).reshape(x32.shape)
    finite = torch.isfinite(grp).all(red).unsqueeze(red).expand_as(grp).reshape(x32.shape)
    return bound, finite


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("pc", [True, False], ids=["key", "val"])
@pytest.mark.parametrize("magnitude", [1.0, 1e4, 1e-6])
def test_kv_roundtrip_error_bound(bits, pc, magnitude):
    gen = torch.Generator().manual_seed(bits + 10 * pc)
    g = 32
    for dtype in DTYPES:
        x = _states((2, 3, 64, 64), dtype, gen, scale=magnitude)
        c, s, m = OPS.kv_quantize(x, bits, g, pc)
        y = OPS.kv_dequantize(c, s, m, 64, bits, g, pc, torch.float32)
        x32 = x.float()
        bound, finite = _roundtrip_bound(x32, s, m, bits, g, pc)
        assert finite.all() and torch.isfinite(s).all() and torch.isfinite(m).all()
        err = (x32 - y).abs()
        slack = 1e-6 * (x32.abs() + m.float().abs().max()) + 1e-12
        assert (err <= bound + slack).all(), f"{dtype}: worst excess {(err - bound).max().item():.3e}"
        if magnitude == 1.0:
            # the simple form: the stored half step plus fp16-rounding slack (the clamp's cut
            # is at most 2^-11 of the group's range and minimum; fp16 subnormals make it
            # larger than this for the tiny magnitudes, which the bound above covers)
            step = s.float() / 2
            step = step.repeat_interleave(g, dim=-2) if pc else step.repeat_interleave(g, dim=-1)
            simple = step + 1e-3 * x32.abs() + 1e-6
            assert (err <= simple).all(), f"{dtype}: simple bound exceeded by {(err - simple).max().item():.3e}"


# ------------------------------------------------------------------------------ kv_append


def _empty_stores(lead, cap, D, bits, g, pc, fill=0):
    P, G = (cap // g, D) if pc else (cap, D // g)
    codes = torch.full((*lead, cap, D * bits // 8), fill, dtype=torch.uint8)
    scales = torch.zeros(*lead, P, G, dtype=torch.float16)
    mins = torch.zeros(*lead, P, G, dtype=torch.float16)
    return codes, scales, mins


@pytest.mark.parametrize("bits,g,pc,splits", [
    (4, 32, False, [1, 1, 5, 17, 40, 1, 63]),
    (2, 16, False, [7, 129, 2]),
    (8, 64, False, [3, 60, 1]),
    (4, 32, True, [32, 64, 32]),
    (2, 16, True, [16, 16, 48, 64]),
    (8, 64, True, [64, 128]),
    (4, 128, True, [128, 128]),
    (2, 16, False, [1, 7, 12, 17]),
    (4, 32, False, [1, 7, 12, 17]),
    (8, 64, True, [64, 128, 64]),
], ids=lambda v: str(v) if not isinstance(v, list) else "-".join(map(str, v)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_append_blocks_equal_quantize_of_concatenation(device, bits, g, pc, splits, dtype):
    gen = torch.Generator().manual_seed(sum(splits) + bits)
    lead = (2, 3)
    T = sum(splits)
    cap = 2 * T + (0 if pc else 3)  # spare capacity (a whole number of groups for keys)
    for D in (128, 64):
        x = _states((*lead, T, D), dtype, gen)
        stores = [t.to(device) for t in _empty_stores(lead, cap, D, bits, g, pc)]
        twin = _empty_stores(lead, cap, D, bits, g, pc)
        off = 0
        for n in splits:
            blk = x[..., off:off + n, :]  # on the CPU a strided view
            assert OPS.kv_append(blk.to(device), *stores, off, bits, g, pc) is None
            ref.kv_append_ref(blk, *twin, off, bits, g, pc)
            off += n
        _assert_quant_eq([t.cpu() for t in stores], twin, f"D={D} vs kv_append_ref")
        P = T // g if pc else T
        want = OPS.kv_quantize(x.to(device), bits, g, pc)
        head = [t.cpu() for t in (stores[0][..., :T, :], stores[1][..., :P, :], stores[2][..., :P, :])]
        _assert_quant_eq(head, [t.cpu() for t in want], f"D={D} vs kv_quantize of the concatenation")
        _assert_quant_eq(head, ref.kv_quantize_ref(x, bits, g, pc), f"D={D} vs the twin of the concatenation")
        # untouched capacity stays zero
        assert (stores[0][..., T:, :] == 0).all()
        assert (stores[1][..., P:, :] == 0).all() and (stores[2][..., P:, :] == 0).all()
        # and dequantizing the stores gives the dequantized concatenation
        y = OPS.kv_dequantize(*stores, T, bits, g, pc, dtype)
        _assert_eq(y.cpu(), OPS.kv_dequantize(*want, T, bits, g, pc, dtype).cpu(), f"D={D} dequantized")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("pc", [True, False], ids=["key", "val"])
def test_kv_append_overwrites_and_keeps_neighbours(bits, pc):
    """Appending over stale stores (all code bits set, garbage params) replaces exactly the
    block's tokens, including every bit plane of the shared code bytes, and nothing else."""
    g, D, lead = 16, 64, (1, 2)
    cap, off, n = 96, 32, 48
    gen = torch.Generator().manual_seed(bits)
    x = _states((*lead, n, D), torch.float32, gen)
    stores = _empty_stores(lead, cap, D, bits, g, pc, fill=0xFF)
    stores[1].fill_(1.5)
    stores[2].fill_(-2.5)
    before = [t.clone() for t in stores]
    OPS.kv_append(x.transpose(0, 1).contiguous().transpose(0, 1), *stores, off, bits, g, pc)  # strided x
    c, s, m = OPS.kv_quantize(x, bits, g, pc)
    p0, p1 = (off // g, (off + n) // g) if pc else (off, off + n)
    assert torch.equal(stores[0][..., off:off + n, :], c)
    _assert_eq(stores[1][..., p0:p1, :], s, "scales")
    _assert_eq(stores[2][..., p0:p1, :], m, "mins")
    for new, old, a, b in ((stores[0], before[0], off, off + n), (stores[1], before[1], p0, p1),
                           (stores[2], before[2], p0, p1)):
        assert torch.equal(new[..., :a, :], old[..., :a, :]) and torch.equal(new[..., b:, :], old[..., b:, :])


# ----------------------------------------------------------------------------- edge values


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("pc", [True, False], ids=["key", "val"])
def test_kv_constant_groups_are_exact(isa, bits, pc):
    g = 32
    for dtype in DTYPES:
        for v in (0.0, 0.1234567, -3.75, 1000.5, -1e-6):
            x = torch.full((2, 2, 64, 64), v).to(dtype)
            c, s, m = OPS.kv_quantize(x, bits, g, pc)
            _assert_quant_eq((c, s, m), ref.kv_quantize_ref(x, bits, g, pc), f"{v} {dtype}")
            assert (c == 0).all() and (s == 0).all()
            assert torch.equal(m, torch.full_like(m, v).to(dtype).to(torch.float16))
            for out_dtype in DTYPES:
                y = OPS.kv_dequantize(c, s, m, 64, bits, g, pc, out_dtype)
                _assert_eq(y, ref.kv_dequantize_ref(c, s, m, 64, bits, g, pc, out_dtype), "dequant")
                exact = x.to(torch.float16).to(torch.float32).to(out_dtype)
                assert torch.equal(y, exact), f"constant {v} {dtype} -> {out_dtype}"
    # constant within each group, a different constant per group
    i = torch.arange(64)
    x = ((i[:, None] // g) * 0.5 - 1 + i[None, :] * 0.25) if pc else ((i[None, :] // g) * 0.5 - 1 + i[:, None] * 0.25)
    x = x.to(torch.float32).contiguous()
    c, s, m = OPS.kv_quantize(x, bits, g, pc)
    assert (s == 0).all() and (c == 0).all()
    for out_dtype in DTYPES:
        assert torch.equal(OPS.kv_dequantize(c, s, m, 64, bits, g, pc, out_dtype), x.to(out_dtype))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("pc", [True, False], ids=["key", "val"])
def test_kv_nonfinite_groups_are_nan_others_unaffected(isa, bits, pc):
    g, D, T = 32, 64, 64
    gen = torch.Generator().manual_seed(bits)
    for dtype in DTYPES:
        clean = _states((2, 2, T, D), dtype, gen)
        x = clean.clone()
        x[0, 0, 3, 5] = float("nan")
        x[0, 1, 40, 7] = float("inf")
        x[1, 1, 63, 63] = -float("inf")
        bad = torch.zeros(x.shape, dtype=torch.bool)
        for b, h, t, d in ((0, 0, 3, 5), (0, 1, 40, 7), (1, 1, 63, 63)):
            if pc:
                bad[b, h, t // g * g:(t // g + 1) * g, d] = True
            else:
                bad[b, h, t, d // g * g:(d // g + 1) * g] = True
        c, s, m = OPS.kv_quantize(x, bits, g, pc)
        _assert_quant_eq((c, s, m), ref.kv_quantize_ref(x, bits, g, pc), f"{dtype}")
        assert s.isnan().sum() == m.isnan().sum() == 3 and torch.equal(s.isnan(), m.isnan())
        c0, s0, m0 = OPS.kv_quantize(clean, bits, g, pc)
        ok = ~s.isnan()
        assert torch.equal(s[ok], s0[ok]) and torch.equal(m[ok], m0[ok])
        unpacked, unpacked0 = ref.kv_unpack_codes(c, bits), ref.kv_unpack_codes(c0, bits)
        assert (unpacked[bad] == 0).all() and torch.equal(unpacked[~bad], unpacked0[~bad])
        for out_dtype in DTYPES:
            y = OPS.kv_dequantize(c, s, m, T, bits, g, pc, out_dtype)
            _assert_eq(y, ref.kv_dequantize_ref(c, s, m, T, bits, g, pc, out_dtype), f"{dtype}->{out_dtype}")
            assert torch.equal(y.isnan(), bad)
            y0 = OPS.kv_dequantize(c0, s0, m0, T, bits, g, pc, out_dtype)
            assert torch.equal(y[~bad], y0[~bad])


@pytest.mark.parametrize("pc", [True, False], ids=["key", "val"])
def test_kv_extreme_magnitudes_and_zeros_match_ref(isa, pc):
    g = 16
    gen = torch.Generator().manual_seed(3)
    for dtype, bits in itertools.product(DTYPES, (2, 4, 8)):
        cases = {
            "large": _states((2, 2, 48, 32), dtype, gen, scale=1e4),
            "tiny": _states((2, 2, 48, 32), dtype, gen, scale=1e-6),
            "zeros": torch.zeros(2, 2, 48, 32, dtype=dtype),
            "mixed": torch.cat([_states((1, 2, 48, 32), dtype, gen, scale=1e4),
                                _states((1, 2, 48, 32), dtype, gen, scale=1e-6)]),
        }
        for name, x in cases.items():
            got = OPS.kv_quantize(x, bits, g, pc)
            _assert_quant_eq(got, ref.kv_quantize_ref(x, bits, g, pc), f"{name} {dtype} b{bits}")
            assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
            for out_dtype in DTYPES:
                y = OPS.kv_dequantize(*got, 40, bits, g, pc, out_dtype)
                _assert_eq(y, ref.kv_dequantize_ref(*got, 40, bits, g, pc, out_dtype), f"{name} -> {out_dtype}")
            if name == "zeros":
                assert all((t == 0).all() for t in got)
                assert (OPS.kv_dequantize(*got, 48, bits, g, pc, torch.float32) == 0).all()


@pytest.mark.parametrize("pc", [True, False], ids=["key", "val"])
def test_kv_extreme_and_nonfinite_groups_match_ref(device, isa, pc):
    """NaN, inf, constant groups, groups past the float16 range (their min/scale become inf) and
    tiny values in one tensor."""
    gen = torch.Generator().manual_seed(5)
    for bits in (2, 4, 8):
        x = torch.randn(2, 2, 64, 64, generator=gen)
        x[0, 0, 3, 5] = float("nan")
        x[0, 1, 10, 7] = float("inf")
        x[1, 0, :32, :] = 3.0  # constant groups
        x[1, 1, 40:, 32:] = 1e5  # beyond fp16: the group's min/scale become inf
        x[1, 1, :8, :8] = 1e-7
        got = OPS.kv_quantize(x.to(device), bits, 32, pc)
        want = ref.kv_quantize_ref(x, bits, 32, pc)
        assert all(t.device.type == device for t in got)
        _assert_quant_eq([t.cpu() for t in got], want, f"bits={bits}")
        y = OPS.kv_dequantize(*got, 64, bits, 32, pc, torch.float32)
        _assert_eq(y.cpu(), ref.kv_dequantize_ref(*want, 64, bits, 32, pc, torch.float32), f"bits={bits} dequantized")


# --------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("pc", [True, False], ids=["key", "val"])
def test_opcheck(device, pc):
    gen = torch.Generator().manual_seed(0)
    bits, g = 4, 32
    x = _states((2, 3, 64, 64), torch.float32, gen).to(device)
    torch.library.opcheck(OPS.kv_quantize.default, (x, bits, g, pc))
    torch.library.opcheck(OPS.kv_quantize.default, (x.to(torch.bfloat16), 2, 16, pc))
    stores = [t.to(device) for t in _empty_stores((2, 3), 128, 64, bits, g, pc)]
    torch.library.opcheck(OPS.kv_append.default, (x[..., :32, :], *stores, 32, bits, g, pc))
    c, s, m = OPS.kv_quantize(x, bits, g, pc)
    torch.library.opcheck(OPS.kv_dequantize.default, (c, s, m, 50, bits, g, pc, torch.float16))
    torch.library.opcheck(OPS.kv_dequantize.default, (c, s, m, 64, bits, g, pc, torch.float32))
    # float16 states: dequantize to bfloat16, into a float32 buffer, append into full stores
    x16 = _states((1, 2, 64, 64), torch.float16, gen).to(device)
    torch.library.opcheck(OPS.kv_quantize.default, (x16, 4, 32, pc))
    c, s, m = OPS.kv_quantize(x16, 4, 32, pc)
    torch.library.opcheck(OPS.kv_dequantize.default, (c, s, m, 64, 4, 32, pc, torch.bfloat16))
    out = torch.empty(1, 2, 64, 64, dtype=torch.float32, device=device)
    torch.library.opcheck(OPS.kv_dequantize_into.default, (c, s, m, out, 32, 4, 32, pc))
    torch.library.opcheck(OPS.kv_append.default, (x16[..., :32, :], c, s, m, 32, 4, 32, pc))


def test_opcheck_kv_dequantize_into(device):
    x = torch.randn(2, 3, 64, 64, device=device)
    c, s, m = OPS.kv_quantize(x, 4, 32, True)
    out = torch.zeros(2, 3, 80, 64, dtype=torch.bfloat16, device=device)
    torch.library.opcheck(OPS.kv_dequantize_into.default, (c, s, m, out, 50, 4, 32, True))


# ---------------------------------------------------------------------------------- errors


def test_ops_reject_bad_arguments(device):
    x = torch.randn(2, 3, 64, 64, device=device)
    ck, sk, mk = OPS.kv_quantize(x, 4, 32, True)  # keys: params [2, 3, 2, 64]
    cv, sv, mv = OPS.kv_quantize(x, 4, 32, False)  # values: params [2, 3, 64, 2]
    wide = OPS.kv_quantize(torch.randn(1, 4, 1024), 8, 32, False)  # quantizes; the dequantizer stops at 512
    shared = [  # on every device
        (lambda: OPS.kv_quantize(x, 4, 48, False), "group_size=48 does not divide head_dim=64"),
        (lambda: OPS.kv_append(x[..., :32, :], ck, sk, mk, 64, 4, 32, True),
         r"tokens \[64, 96\) do not fit the stores' capacity"),
    ]
    x1 = x[:1, :2].contiguous()
    c1, s1, m1 = OPS.kv_quantize(x1, 4, 32, True)
    cuda_only = [  # tensors left on the CPU
        (lambda: OPS.kv_dequantize(c1, s1.cpu(), m1, 64, 4, 32, True, torch.float32),
         "kv_dequantize: scales is on cpu"),
        (lambda: OPS.kv_append(x1.cpu()[..., :32, :], c1, s1, m1, 0, 4, 32, True), "kv_append: x is on cpu"),
        (lambda: OPS.kv_dequantize_into(c1, s1, m1, torch.empty(1, 2, 64, 64), 64, 4, 32, True),
         "kv_dequantize_into: out is on cpu"),
    ]
    cpu_only = [
        # kv_quantize
        (lambda: OPS.kv_quantize(x, 3, 32, True), "bits=3 is not supported"),
        (lambda: OPS.kv_quantize(x, 16, 32, False), "bits=16 is not supported"),
        (lambda: OPS.kv_quantize(x, 4, 0, True), "group_size=0 must be positive"),
        (lambda: OPS.kv_quantize(x, 4, 0, False), "group_size=0 must be positive"),
        (lambda: OPS.kv_quantize(x, 4, -32, False), "group_size=-32 must be positive"),
        (lambda: OPS.kv_quantize(x[..., :63, :], 4, 32, True), "32-token groups; got 63 tokens"),
        (lambda: OPS.kv_quantize(x[..., :6], 2, 2, False), "head_dim=6 does not pack into whole bytes"),
        (lambda: OPS.kv_quantize(x.to(torch.int32), 4, 32, False), "must be float32, bfloat16 or float16"),
        (lambda: OPS.kv_quantize(x.double(), 4, 32, False), "must be float32, bfloat16 or float16"),
        (lambda: OPS.kv_quantize(x[0, 0, 0], 4, 32, False), "tokens, head_dim"),
        # kv_append
        (lambda: OPS.kv_append(x[..., :8, :], cv, sv, mv, 60, 4, 32, False), r"tokens \[60, 68\) do not fit"),
        (lambda: OPS.kv_append(x[..., :8, :], cv, sv, mv, -1, 4, 32, False), r"tokens \[-1, 7\) do not fit"),
        (lambda: OPS.kv_append(x[..., :32, :], ck, sk, mk, 16, 4, 32, True), "32-token boundaries"),
        (lambda: OPS.kv_append(x[..., :16, :], ck, sk, mk, 0, 4, 32, True), "32-token boundaries"),
        (lambda: OPS.kv_append(x[..., :8, :].to(torch.int32), cv, sv, mv, 0, 4, 32, False),
         "must be float32, bfloat16 or float16"),
        (lambda: OPS.kv_append(x[..., :8, :32], cv, sv, mv, 0, 4, 32, False), "head_dim 32, the stores 64"),
        (lambda: OPS.kv_append(x[:1, :, :8, :], cv, sv, mv, 0, 4, 32, False), "x has shape"),
        (lambda: OPS.kv_append(x[0, :, :8, :], cv, sv, mv, 0, 4, 32, False), "leading dimensions"),
        (lambda: OPS.kv_append(x[..., :8, :], cv.to(torch.int8), sv, mv, 0, 4, 32, False),
         "codes must be a contiguous uint8"),
        (lambda: OPS.kv_append(x[..., :8, :], cv, sv.float(), mv, 0, 4, 32, False),
         "scales and mins must be contiguous float16"),
        (lambda: OPS.kv_append(x[..., :8, :], cv, sv, mv.bfloat16(), 0, 4, 32, False),
         "scales and mins must be contiguous float16"),
        (lambda: OPS.kv_append(x[..., :8, :], cv, sv, mv, 0, 3, 32, False), "bits=3 is not supported"),
        (lambda: OPS.kv_append(x[..., :8, :], cv, sv, mv, 0, 4, 0, False), "group_size=0 must be positive"),
        # stores of the other scheme: params shaped for values given as keys
        (lambda: OPS.kv_append(x[..., :32, :], cv, sv, mv, 0, 4, 32, True), "scales and mins must be"),
        # kv_dequantize
        (lambda: OPS.kv_dequantize(ck, sk, mk, 65, 4, 32, True, torch.float32), "length=65 is outside"),
        (lambda: OPS.kv_dequantize(cv, sv, mv, -1, 4, 32, False, torch.float32), "length=-1 is outside"),
        (lambda: OPS.kv_dequantize(cv, sv, mv, 8, 3, 32, False, torch.float32), "bits=3 is not supported"),
        (lambda: OPS.kv_dequantize(cv, sv, mv, 8, 4, 0, False, torch.float32), "group_size=0 must be positive"),
        (lambda: OPS.kv_dequantize(cv, sv, mv, 8, 4, 48, False, torch.float32), "group_size=48 does not divide"),
        (lambda: OPS.kv_dequantize(ck[..., :48, :].contiguous(), sk, mk, 8, 4, 32, True, torch.float32),
         "32-token groups; got 48 tokens"),
        (lambda: OPS.kv_dequantize(cv.to(torch.int32), sv, mv, 8, 4, 32, False, torch.float32),
         "codes must be a contiguous uint8"),
        (lambda: OPS.kv_dequantize(cv.transpose(0, 1), sv, mv, 8, 4, 32, False, torch.float32),
         "codes must be a contiguous uint8"),
        (lambda: OPS.kv_dequantize(cv, sv.float(), mv, 8, 4, 32, False, torch.float32),
         "scales and mins must be contiguous float16"),
        (lambda: OPS.kv_dequantize(cv, sv, mv[..., :1], 8, 4, 32, False, torch.float32),
         "scales and mins must be contiguous float16"),
        (lambda: OPS.kv_dequantize(cv, sv, mv, 8, 4, 32, False, torch.int32), "must be float32, bfloat16 or float16"),
        (lambda: OPS.kv_dequantize(*wide, 4, 8, 32, False, torch.float32), "head_dim=1024 is larger than 512"),
        (lambda: OPS.kv_dequantize_into(cv, sv, mv, torch.empty(2, 3, 7, 64), 8, 4, 32, False),
         "out must be a contiguous"),
        (lambda: OPS.kv_dequantize_into(cv, sv, mv, torch.empty(2, 3, 8, 32), 8, 4, 32, False),
         "out must be a contiguous"),
        (lambda: OPS.kv_dequantize_into(cv, sv, mv, torch.empty(2, 3, 64, 8).mT, 8, 4, 32, False),
         "out must be a contiguous"),
        (lambda: OPS.kv_dequantize_into(cv, sv, mv, torch.empty(3, 8, 64), 8, 4, 32, False),
         "out must be a contiguous"),
        (lambda: OPS.kv_dequantize_into(cv, sv, mv, torch.empty(3, 2, 8, 64), 8, 4, 32, False),
         "out has shape"),
    ]
    for fn, msg in shared + (cpu_only if device == "cpu" else cuda_only):
        with pytest.raises(RuntimeError, match=msg):
            fn()
