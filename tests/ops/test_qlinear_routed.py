"""hfquant::qlinear_routed (the routed-expert linear of MoE layers) against its pure-torch twin
in hfquant/ref.py and, bit for bit, against hfquant::qlinear called on each expert's rows, on
every device (`device`) and every kernel path (`qlinear_path`, `isa`).

The CPU kernel serves an expert whose row count qlinear gives the GEMV kernels itself (one
parallel region over all such experts' tile ranges) and hands an expert with more rows to
qlinear; the routings below put experts on both sides of that line (1 row, a few, 40, 150),
leave experts without rows, put every row on one expert, and give R = 0 and R = 1.
"""
from __future__ import annotations

import random

import pytest
import torch

import hfquant
import hfquant.ops  # noqa: F401  (registers the fake kernels)
from _utils import assert_close
from hfquant import ops, ref

GROUP_SIZES = [32, 64, 128, -1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, K, E): odd N, K not a multiple of 32 and ragged against the group sizes
SHAPES = [(17, 300, 5), (70, 160, 3), (37, 576, 4)]


def _name(v):
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else str(v)


def make_quantized(N, K, bits, group_size, asym, gen):
    """Random canonical checkpoint tensors (qweight, scales, zeros) as repack takes them."""
    _, G = ref.group_geometry(group_size, K)
    v = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.int32)
    if bits == 4:
        vp = torch.nn.functional.pad(v, (0, K % 2))
        qweight = (vp[:, 0::2] | (vp[:, 1::2] << 4)).to(torch.uint8)
    else:
        qweight = v.to(torch.uint8) if asym else (v - 128).to(torch.int8)
    scales = torch.rand(N, G, generator=gen) * 0.02 + 0.001
    zeros = torch.randint(0, 1 << bits, (N, G), generator=gen, dtype=torch.int32).to(torch.uint8) if asym else None
    return qweight, scales, zeros


def experts(device, E, N, K, bits, group_size, asym, gen):
    """(packed_weight, packed_scales) of E random experts stacked, repacked on `device`, and
    the CPU layout of the same checkpoint tensors (what the float64 twin reads)."""
    on_dev, on_cpu = [], []
    for _ in range(E):
        qw, sc, z = make_quantized(N, K, bits, group_size, asym, gen)
        on_dev.append(torch.ops.hfquant.repack(*[None if t is None else t.to(device) for t in (qw, sc, z)], bits,
                                               group_size, K))
        on_cpu.append(ref.repack_ref(qw, sc, z, bits, group_size, K))
    stack = lambda ps: (torch.stack([p[0] for p in ps]), torch.stack([p[1] for p in ps]))  # noqa: E731
    return (*stack(on_dev), *stack(on_cpu))


def routings(E, gen):
    """Expert ids [R] (int64): R = 0, R = 1, decode (distinct experts, some without rows),
    random rows over all experts, every row on one expert, and a mix of 1, few and many rows."""
    out = [torch.zeros(0, dtype=torch.long), torch.tensor([E - 1]),
           torch.randperm(E, generator=gen)[: max(1, E - 2)],
           torch.randint(0, E, (33,), generator=gen),
           torch.full((40,), E // 2, dtype=torch.long)]
    mix = [0] + [1] * 3 + [E - 1] * 40
    if E > 3:
        mix += [2] * 150
    ids = torch.tensor(mix)
    out.append(ids[torch.randperm(len(mix), generator=gen)])
    return out


def step_scale(x, sb, ids, group_size, N, K):
    """max over rows of |x| @ S_e^T (S_e the scales of the row's expert, CPU layout): the output
    of a one-step weight, the tolerance's floor."""
    best = 0.0
    for e in ids.unique().tolist():
        xe = x[ids == e].double().abs()
        s = sb[e][:, :, 0, :].permute(0, 2, 1).reshape(-1, sb.shape[2])[:N].double()
        S = s.repeat_interleave(ref.group_geometry(group_size, K)[0], dim=1)[:, :K]
        best = max(best, (xe @ S.t()).max().item())
    return best


def per_expert(x, w, sb, ids, bias, bits, group_size, N, K):
    """hfquant.ops.qlinear on the rows of each expert in turn, written to their rows."""
    y = x.new_empty((x.shape[0], N))
    for e in ids.unique().tolist():
        rows = (ids == e).nonzero().flatten()
        y[rows] = ops.qlinear(x[rows], w[e], sb[e], None if bias is None else bias[e], bits, group_size, N, K)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}")
def test_routed_matches_ref(device, qlinear_path, bits, group_size, dtype):
    gen = torch.Generator().manual_seed(bits * 1000 + group_size)
    for i, (N, K, E) in enumerate(SHAPES):
        asym = bool(i % 2)
        w, sb, wc, sbc = experts(device, E, N, K, bits, group_size, asym, gen)
        for j, ids in enumerate(routings(E, gen)):
            x = torch.randn(len(ids), K, generator=gen).to(dtype)
            bias = torch.randn(E, N, generator=gen).to(dtype if j % 2 else torch.float32) if j % 3 else None
            id_t = ids.to(torch.int32) if j % 2 else ids
            y = torch.ops.hfquant.qlinear_routed(x.to(device), w, sb, id_t.to(device),
                                                 None if bias is None else bias.to(device), bits, group_size, N, K)
            msg = f"{qlinear_path} N={N} K={K} E={E} asym={asym} routing {j}"
            assert y.device.type == device and y.dtype == dtype and y.shape == (len(ids), N), msg
            want = ref.qlinear_routed_ref(x.double(), wc, sbc, ids, None if bias is None else bias.double(), bits,
                                          group_size, N, K)
            assert_close(y.cpu(), want, dtype, msg, scale=step_scale(x, sbc, ids, group_size, N, K))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits,group_size,asym", [(4, 128, False), (8, -1, True), (4, 32, True)],
                         ids=["w4-g128-sym", "w8-gch-asym", "w4-g32-asym"])
def test_routed_equals_per_expert_qlinear(device, isa, bits, group_size, asym, threads):
    """Each expert's rows exactly as qlinear gives them, on every path of both sides of the
    GEMV / larger-M line, for any thread count (T = 50 tiles: the decode case splits every
    expert's tiles over the threads)."""
    gen = torch.Generator().manual_seed(5)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for N, K, E in ((200, 300, 8), (17, 100, 6)):
            w, sb, _, _ = experts(device, E, N, K, bits, group_size, asym, gen)
            for j, ids in enumerate(routings(E, gen) + [torch.randperm(E, generator=gen)]):
                for dtype in DTYPES:
                    x = torch.randn(len(ids), K, generator=gen).to(dtype).to(device)
                    bias = None if j % 2 else torch.randn(E, N, generator=gen).to(dtype).to(device)
                    ids = ids.to(device)
                    got = ops.qlinear_routed(x, w, sb, ids, bias, bits, group_size, N, K)
                    want = per_expert(x, w, sb, ids, bias, bits, group_size, N, K)
                    assert torch.equal(got, want), (isa, N, K, j, dtype)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("max_m,gemm", [(0, True), (0, False), (1 << 20, True)],
                         ids=["gemm", "blocked", "gemv"])
def test_routed_forced_paths(max_m, gemm):
    """With qlinear's path switches forced, every expert still gets exactly qlinear's result."""
    gen = torch.Generator().manual_seed(6)
    N, K, E = 37, 576, 4
    w, sb, _, _ = experts("cpu", E, N, K, 4, 64, True, gen)
    with hfquant.settings(gemv_max_m=max_m, qgemm=gemm):
        for ids in routings(E, gen):
            for dtype in DTYPES:
                x = torch.randn(len(ids), K, generator=gen).to(dtype)
                bias = torch.randn(E, N, generator=gen)
                got = ops.qlinear_routed(x, w, sb, ids, bias, 4, 64, N, K)
                assert torch.equal(got, per_expert(x, w, sb, ids, bias, 4, 64, N, K)), (max_m, gemm, dtype)


def test_routed_random_cases(device):
    """Seeded random shapes, routings, dtypes, strided x and bias dtypes against the twin and
    the per-expert loop."""
    rnd = random.Random(11)
    gen = torch.Generator().manual_seed(11)
    for case in range(25):
        bits, group_size, asym = rnd.choice([4, 8]), rnd.choice(GROUP_SIZES), rnd.random() < 0.5
        N, K, E = rnd.randint(1, 70), rnd.choice([1, 7, 31, 33, 100, 257]), rnd.randint(1, 9)
        R = rnd.choice([0, 1, 2, 5, 17, 64])
        dtype = rnd.choice(DTYPES)
        w, sb, wc, sbc = experts(device, E, N, K, bits, group_size, asym, gen)
        ids = torch.randint(0, E, (R,), generator=gen)
        x = torch.randn(R, 2 * K, generator=gen).to(dtype)[:, ::2] if rnd.random() < 0.3 else \
            torch.randn(R, K, generator=gen).to(dtype)
        bias = rnd.choice([None, torch.randn(E, N, generator=gen).to(dtype), torch.randn(E, N, generator=gen)])
        args = (bits, group_size, N, K)
        y = ops.qlinear_routed(x.to(device), w, sb, ids.to(device), None if bias is None else bias.to(device), *args)
        msg = f"case {case}: bits={bits} g{group_size} asym={asym} N={N} K={K} E={E} R={R} {dtype}"
        want = ref.qlinear_routed_ref(x.double(), wc, sbc, ids, None if bias is None else bias.double(), *args)
        assert_close(y.cpu(), want, dtype, msg, scale=step_scale(x, sbc, ids, group_size, N, K))
        loop = per_expert(x.to(device), w, sb, ids.to(device), None if bias is None else bias.to(device), *args)
        assert torch.equal(y, loop), msg


def test_routed_reads_only_selected_experts():
    """NaN weights of the experts no row selects never reach the output."""
    gen = torch.Generator().manual_seed(12)
    N, K, E = 40, 96, 6
    w, sb, _, _ = experts("cpu", E, N, K, 4, 32, False, gen)
    sb = sb.clone()
    sb[[0, 2, 5]] = float("nan")
    ids = torch.tensor([1, 3, 4, 3, 1, 1])
    x = torch.randn(len(ids), K, generator=gen)
    y = ops.qlinear_routed(x, w, sb, ids, None, 4, 32, N, K)
    assert torch.isfinite(y).all()
    assert torch.equal(y, per_expert(x, w, sb, ids, None, 4, 32, N, K))


def test_ref_backend_and_direct_entry():
    """The wrapper's routes: the direct CPU entry (bit-identical to the dispatcher, same
    errors), the dispatcher when a gradient is wanted, the twin under backend="ref"."""
    gen = torch.Generator().manual_seed(13)
    N, K, E = 37, 300, 4
    w, sb, _, _ = experts("cpu", E, N, K, 4, 128, True, gen)
    ids = torch.tensor([3, 0, 3, 2])
    x = torch.randn(4, K, generator=gen)
    bias = torch.randn(E, N, generator=gen)
    assert hfquant.ops._direct_ok(x, w, sb, bias)
    with torch.no_grad():
        got = ops.qlinear_routed(x, w, sb, ids, bias, 4, 128, N, K)
    assert torch.equal(got, torch.ops.hfquant.qlinear_routed(x, w, sb, ids, bias, 4, 128, N, K))
    with hfquant.settings(backend="ref"):
        r = ops.qlinear_routed(x, w, sb, ids, bias, 4, 128, N, K)
    assert torch.equal(r, ref.qlinear_routed_ref(x, w, sb, ids, bias, 4, 128, N, K))
    assert_close(got, r.double(), torch.float32, "ref backend", scale=step_scale(x, sb, ids, 128, N, K))
    with pytest.raises(RuntimeError, match=r"hfquant::qlinear_routed: expert id 4 at row 1 is out of range for 4 "
                                           r"experts"):
        ops.qlinear_routed(x, w, sb, torch.tensor([0, 4, 0, 0]), None, 4, 128, N, K)
    with hfquant.settings(backend="ref"), \
            pytest.raises(ValueError, match=r"hfquant::qlinear_routed: expert id -1 at row 2 is out of range"):
        ops.qlinear_routed(x, w, sb, torch.tensor([0, 1, -1, 0]), None, 4, 128, N, K)


def test_opcheck(device):
    gen = torch.Generator().manual_seed(14)
    N, K, E = 17, 300, 3
    for bits, group_size, asym in ((4, 128, False), (8, 32, True)):
        w, sb, _, _ = experts(device, E, N, K, bits, group_size, asym, gen)
        cases = ((torch.randn(5, K, generator=gen), torch.tensor([2, 0, 2, 2, 1]), torch.randn(E, N, generator=gen)),
                 (torch.randn(1, K, generator=gen).to(torch.bfloat16), torch.tensor([1], dtype=torch.int32), None),
                 (torch.randn(0, K, generator=gen), torch.zeros(0, dtype=torch.long), None))
        for x, ids, bias in cases:
            args = (x.to(device), w, sb, ids.to(device), None if bias is None else bias.to(device), bits,
                    group_size, N, K)
            torch.library.opcheck(torch.ops.hfquant.qlinear_routed.default, args)


def test_routed_rejects_bad_arguments(device):
    gen = torch.Generator().manual_seed(15)
    N, K, E = 8, 64, 3
    w, sb, _, _ = experts(device, E, N, K, 4, 32, device == "cuda", gen)
    x = torch.randn(2, K, device=device)
    ids = torch.tensor([0, 2], device=device)
    op = torch.ops.hfquant.qlinear_routed

    def bad(match, *args):
        with pytest.raises(RuntimeError, match=match):
            op(*args)

    bad(r"hfquant::qlinear_routed: x has shape \[1, 2, 64\], expected \[rows, in_features=64\]",
        x[None], w, sb, ids, None, 4, 32, N, K)
    bad(r"x has shape \[2, 63\], expected \[rows, in_features=64\]",
        torch.randn(2, 63, device=device), w, sb, ids, None, 4, 32, N, K)
    bad(r"x must be float32, bfloat16 or float16, got Int",
        torch.ones(2, K, dtype=torch.int32, device=device), w, sb, ids, None, 4, 32, N, K)
    bad(r"expert_ids must be int64 or int32, got Float", x, w, sb, ids.float(), None, 4, 32, N, K)
    bad(r"expert_ids has shape \[3\], expected \[2\] \(one expert per row of x\)",
        x, w, sb, torch.tensor([0, 1, 2], device=device), None, 4, 32, N, K)
    bad(r"expert_ids has shape \[2, 1\], expected \[2\]", x, w, sb, ids[:, None], None, 4, 32, N, K)
    bad(r"hfquant::qlinear_routed: expert id 3 at row 1 is out of range for 3 experts",
        x, w, sb, torch.tensor([0, 3], device=device), None, 4, 32, N, K)
    bad(r"expert id -1 at row 0 is out of range for 3 experts",
        x, w, sb, torch.tensor([-1, 0], dtype=torch.int32, device=device), None, 4, 32, N, K)
    bad(r"packed_weight holds 3 experts but packed_scales holds 2", x, w, sb[:2].contiguous(), ids, None, 4, 32, N, K)
    bad(r"bias has shape \[3, 7\], expected \[3, 8\] \(experts, out_features\)",
        x, w, sb, ids, torch.randn(E, 7, device=device), 4, 32, N, K)
    bad(r"bias has shape \[8\], expected \[3, 8\]", x, w, sb, ids, torch.randn(N, device=device), 4, 32, N, K)
    bad(r"bias must be BFloat16 \(like x\) or float32, got Half",
        x.bfloat16(), w, sb, ids, torch.randn(E, N, device=device).half(), 4, 32, N, K)
    bad(r"hfquant::qlinear_routed: bits=3 is not supported", x, w, sb, ids, None, 3, 32, N, K)
    if device == "cuda":
        bad(r"hfquant::qlinear_routed: expert_ids is on cpu", x, w, sb, ids.cpu(), None, 4, 32, N, K)
        bad(r"packed_weight has shape \[64, 64\], expected \[E, Np, Kp\*bits/8\]", x, w[0], sb, ids, None, 4, 32, N, K)
        return
    bad(r"group_size=48 must be -1 \(per channel\) or a positive multiple of 32", x, w, sb, ids, None, 4, 48, N, K)
    bad(r"packed_weight has shape \[2, 2, 4, 16\], expected \[E, 2, 2, 4, 16\] \(E >= 1 experts\) for bits=4, "
        r"out_features=8, in_features=64", x, w[0], sb, ids, None, 4, 32, N, K)
    bad(r"packed_weight has shape \[3, 2, 2, 4, 16\], expected \[E, 2, 3, 4, 16\]",
        torch.randn(2, 96), w, sb, ids, None, 4, 32, N, 96)
    bad(r"packed_weight has shape \[0, 2, 2, 4, 16\], expected \[E, 2, 2, 4, 16\] \(E >= 1 experts\)",
        x[:0], w[:0], sb[:0], ids[:0], None, 4, 32, N, K)
    bad(r"packed_weight must be a contiguous uint8 CPU tensor", x, w.to(torch.int8), sb, ids, None, 4, 32, N, K)
    bad(r"packed_weight must be a contiguous uint8 CPU tensor", x, w[:, :, :1], sb, ids, None, 4, 32, N, K)
    bad(r"packed_scales has shape \[3, 2, 2, 2, 4\], expected \[E, 2, 1, 2, 4\] for group_size=-1",
        x, w, sb, ids, None, 4, -1, N, K)
    bad(r"packed_scales must be a contiguous float32 CPU tensor", x, w, sb.double(), ids, None, 4, 32, N, K)
    bad(r"out_features=0 and in_features=64 must be positive", x, w, sb, ids, None, 4, 32, 0, K)
