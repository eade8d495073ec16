"""The quantized KV-cache ops on CUDA against their pure-torch twins in hfquant/ref.py.

Element-wise arithmetic in the twin's order (explicitly rounded fp32 steps, no FMA), so
codes, fp16 scales/mins and dequantized states must match BITWISE (NaN where the twin
has NaN). Skipped without a GPU.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import hfquant.ops  # noqa: F401  (registers the fake kernels)
from cuda_util import equal_nan, requires_cuda
from hfquant import ref

pytestmark = requires_cuda

OPS = torch.ops.hfquant
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCHEMES = list(itertools.product((2, 4, 8), (16, 32, 64, 128), (True, False)))


def _sid(s):
    return f"b{s[0]}-g{s[1]}-{'key' if s[2] else 'val'}"


def _shapes(bits, g, pc):
    """[B, H, T, D]: D in 32/64/128 (g | D for values), T whole groups for keys, odd for values."""
    out = []
    for i, D in enumerate(D for D in (32, 64, 128) if pc or D % g == 0):
        B, H = 1 + (i + bits) % 3, 1 + (i + g // 16) % 3
        out += [(B, H, g * (1 + i % 3), D)] if pc else [(B, H, T, D) for T in (1, 7, 129)]
    return out


def _states(shape, dtype, gen, scale=1.0):
    *lead, T, D = shape
    spread = torch.rand(*lead, 1, 1, generator=gen) * 0.9 + 0.1
    shift = torch.randn(*lead, 1, D, generator=gen).clamp(-1, 1)
    x = torch.randn(*shape, generator=gen).clamp(-4, 4) * spread * 0.5 + shift
    return (x * scale).to(dtype)


def _assert_all_eq(got, want, what):
    for name, a, b in zip(("codes", "scales", "mins"), got, want):
        assert a.device.type == "cuda", f"{what} {name} not on the GPU"
        assert equal_nan(a, b), f"{what} {name} differ"


@pytest.mark.parametrize("scheme", SCHEMES, ids=_sid)
def test_kv_quantize_and_dequantize_match_ref(scheme):
    bits, g, pc = scheme
    gen = torch.Generator().manual_seed(bits * 100 + g)
    for shape in _shapes(bits, g, pc):
        for dtype in DTYPES:
            x = _states(shape, dtype, gen)
            got = OPS.kv_quantize(x.to(DEV), bits, g, pc)
            want = ref.kv_quantize_ref(x, bits, g, pc)
            _assert_all_eq(got, want, f"{shape} {dtype}")
            T = shape[-2]
            for length in {T, T // 2 // g * g if pc else T // 2}:
                for out_dtype in DTYPES:
                    y = OPS.kv_dequantize(*got, length, bits, g, pc, out_dtype)
                    yr = ref.kv_dequantize_ref(*want, length, bits, g, pc, out_dtype)
                    assert equal_nan(y, yr), f"dequantize {shape} {dtype}->{out_dtype} length={length}"
                    buf = torch.full((*shape[:-2], T + 3, shape[-1]), 7.0, dtype=out_dtype, device=DEV)
                    OPS.kv_dequantize_into(*got, buf, length, bits, g, pc)
                    assert equal_nan(buf[..., :length, :], yr) and (buf[..., length:, :] == 7).all()


@pytest.mark.parametrize("bits,g,pc", [(4, 32, True), (2, 16, False), (8, 64, True), (4, 32, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_append_blocks_equal_quantize_of_concatenation(bits, g, pc, dtype):
    gen = torch.Generator().manual_seed(11)
    shape = (2, 3, 4 * g if pc else 37, 64)
    x = _states(shape, dtype, gen)
    T = shape[-2]
    cap = T + 2 * g
    codes = torch.zeros(2, 3, cap, 64 * bits // 8, dtype=torch.uint8, device=DEV)
    prow = cap // g if pc else cap
    pcol = 64 if pc else 64 // g
    scales = torch.zeros(2, 3, prow, pcol, dtype=torch.float16, device=DEV)
    mins = torch.zeros_like(scales)
    splits = [0, g, 3 * g, T] if pc else [0, 1, 8, 20, T]
    for a, b in zip(splits, splits[1:]):
        OPS.kv_append(x[..., a:b, :].to(DEV), codes, scales, mins, a, bits, g, pc)
    want = ref.kv_quantize_ref(x, bits, g, pc)
    p = T // g if pc else T
    assert equal_nan(codes[..., :T, :], want[0])
    assert equal_nan(scales[..., :p, :], want[1]) and equal_nan(mins[..., :p, :], want[2])
    assert (codes[..., T:, :] == 0).all() and (scales[..., p:, :] == 0).all()


@pytest.mark.parametrize("pc", [True, False], ids=["key", "val"])
def test_kv_extreme_and_nonfinite_groups_match_ref(pc):
    gen = torch.Generator().manual_seed(5)
    for bits in (2, 4, 8):
        x = torch.randn(2, 2, 64, 64, generator=gen)
        x[0, 0, 3, 5] = float("nan")
        x[0, 1, 10, 7] = float("inf")
        x[1, 0, :32, :] = 3.0  # constant groups
        x[1, 1, 40:, 32:] = 1e5  # beyond fp16: the group's min/scale become inf
        x[1, 1, :8, :8] = 1e-7
        got = OPS.kv_quantize(x.to(DEV), bits, 32, pc)
        want = ref.kv_quantize_ref(x, bits, 32, pc)
        _assert_all_eq(got, want, f"bits={bits}")
        y = OPS.kv_dequantize(*got, 64, bits, 32, pc, torch.float32)
        assert equal_nan(y, ref.kv_dequantize_ref(*want, 64, bits, 32, pc, torch.float32))


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    x = _states((1, 2, 64, 64), torch.float16, gen).to(DEV)
    for pc in (True, False):
        torch.library.opcheck(OPS.kv_quantize.default, (x, 4, 32, pc))
        c, s, m = OPS.kv_quantize(x, 4, 32, pc)
        torch.library.opcheck(OPS.kv_dequantize.default, (c, s, m, 64, 4, 32, pc, torch.bfloat16))
        out = torch.empty(1, 2, 64, 64, dtype=torch.float32, device=DEV)
        torch.library.opcheck(OPS.kv_dequantize_into.default, (c, s, m, out, 32, 4, 32, pc))
        torch.library.opcheck(OPS.kv_append.default, (x[..., :32, :], c, s, m, 32, 4, 32, pc))


def test_bad_arguments_are_named():
    x = torch.randn(1, 2, 64, 64, device=DEV)
    c, s, m = OPS.kv_quantize(x, 4, 32, True)
    with pytest.raises(RuntimeError, match="kv_dequantize: scales is on cpu"):
        OPS.kv_dequantize(c, s.cpu(), m, 64, 4, 32, True, torch.float32)
    with pytest.raises(RuntimeError, match="kv_append: x is on cpu"):
        OPS.kv_append(x.cpu()[..., :32, :], c, s, m, 0, 4, 32, True)
    with pytest.raises(RuntimeError, match="do not fit the stores' capacity"):
        OPS.kv_append(x[..., :32, :], c, s, m, 64, 4, 32, True)
    with pytest.raises(RuntimeError, match="group_size=48 does not divide head_dim=64"):
        OPS.kv_quantize(x, 4, 48, False)
    out = torch.empty(1, 2, 64, 64, device="cpu")
    with pytest.raises(RuntimeError, match="kv_dequantize_into: out is on cpu"):
        OPS.kv_dequantize_into(c, s, m, out, 64, 4, 32, True)
