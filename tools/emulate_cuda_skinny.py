"""Lane-level emulation of csrc/cuda/qlinear_skinny.cuh on the CPU: its index arithmetic,
shared-memory staging, weight decode, mma.m16n8k16 fragment layouts and split-K fixup,
replayed in float64 lane by lane and compared with hfquant.ref.qlinear_ref.

Not a test of the GPU (that is tests/ops/test_qlinear.py, its cuda params): a check, runnable
without one, that the kernel's addresses read the right x, weight and scale elements. Keep it
in step with the kernel when either changes.

    python tools/emulate_cuda_skinny.py        # ~15 s; prints the error of each case
"""
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "ops"))
sys.path.insert(0, str(ROOT / "tests"))
from hfquant import ref  # noqa: E402

KSEG = 64
COLS = 128


def seg_k(bits):
    return 128 if bits == 4 else 64


def choose_segs(col_blocks, units, sms=132):
    slots = 2 * sms
    best, best_cost = 1, None
    for s in range(8, 0, -1):
        blocks = col_blocks * -(-units // s)
        cost = -(-blocks // slots) * (s + 2)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return min(best, units)


def mma(D, A_lanes, B_lanes):
    """D[lane][4] += A (from lanes' 4 registers of pairs) @ B (lanes' 2 registers of pairs)."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        h = A_lanes[lane]
        A[g, 2 * t:2 * t + 2] = h[0]
        A[g + 8, 2 * t:2 * t + 2] = h[1]
        A[g, 2 * t + 8:2 * t + 10] = h[2]
        A[g + 8, 2 * t + 8:2 * t + 10] = h[3]
        b = B_lanes[lane]
        B[2 * t:2 * t + 2, g] = b[0]
        B[2 * t + 8:2 * t + 10, g] = b[1]
    C = A @ B
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        D[lane][0] += C[g, 2 * t]
        D[lane][1] += C[g, 2 * t + 1]
        D[lane][2] += C[g + 8, 2 * t]
        D[lane][3] += C[g + 8, 2 * t + 1]


def run(x, w, ps, bias, bits, group_size, N, K, segs=0, f32=False):
    M = x.shape[0]
    assert M <= 64
    w = w.numpy()
    psf = ps.numpy().reshape(-1)
    G, P, Np = ps.shape
    KU = seg_k(bits)
    KW = 32 if bits == 4 else 16
    Kp = -(-K // KU) * KU
    ldw = Kp * bits // 8
    gs = Kp if group_size == -1 else group_size
    units = Kp // KU
    Ke = K + (K % 2)
    xe = np.zeros((M, Ke))
    xe[:, :K] = x.numpy()
    col_blocks = -(-Np // COLS)
    m_tiles = -(-M // 16)
    segs = min(segs, 8, units) if segs > 0 else choose_segs(col_blocks * m_tiles, units)
    splits = -(-units // segs)
    gmax = min(G, (segs * KU - 1) // gs + 2)
    x_stride = segs * KU + 8 if f32 else segs * KU // 2 + 4
    per_word = group_size != -1 and group_size % KU != 0
    zsym = 8.0 if bits == 4 else 128.0
    ws = np.full((splits, M, Np), np.nan)
    counters = np.zeros((m_tiles, col_blocks), dtype=int)
    y = np.full((M, N), np.nan)
    for bz, bx, by in itertools.product(range(m_tiles), range(col_blocks), range(splits)):
        m0 = bz * 16
        mrows = min(16, M - m0)
        nb0 = bx * COLS
        u_begin = by * segs
        s_cnt = min(segs, units - u_begin)
        # staging: smem words; 16-bit: word = pair (two values), fp32: one value
        xs = [None] * (mrows * x_stride)
        kc0 = u_begin * KU
        kcw = s_cnt * KU if f32 else s_cnt * KU // 2
        for idx in range(mrows * kcw):
            r, c = divmod(idx, kcw)
            k = kc0 + (c if f32 else 2 * c)
            if f32:
                v = xe[m0 + r, k] if k < Ke else 0.0
            else:
                v = (xe[m0 + r, k], xe[m0 + r, k + 1]) if k < Ke else (0.0, 0.0)
            xs[r * x_stride + c] = v
        g_lo = min((u_begin * KU) // gs, G - 1)
        g_hi = min(((u_begin + s_cnt) * KU - 1) // gs, G - 1)
        assert g_hi - g_lo + 1 <= gmax
        ss = np.full(gmax * P * COLS, np.nan)
        for idx in range((g_hi - g_lo + 1) * P * (COLS // 4)):
            row, q = divmod(idx, COLS // 4)
            n = nb0 + 4 * q
            gl, p = divmod(row, P)
            vals = psf[((g_lo + gl) * P + p) * Np + n:((g_lo + gl) * P + p) * Np + n + 4] if n < Np else np.zeros(4)
            ss[4 * idx:4 * idx + 4] = vals
        for warp in range(8):
            n_base = nb0 + warp * 16
            if n_base >= Np:
                continue
            cw = warp * 16
            acc = [[[0.0] * 4 for _ in range(32)] for _ in range(2)]  # [tile][lane][4]
            part = [[[0.0] * 4 for _ in range(32)] for _ in range(2)]

            def words(lane, i, tile):
                g, t = lane >> 2, lane & 3
                off = (n_base + g + 8 * tile) * ldw + 16 * t + u_begin * KSEG + i * KSEG
                row, col = divmod(off, ldw)
                b = w[row, col:col + 16]
                return [int(b[4 * j]) | int(b[4 * j + 1]) << 8 | int(b[4 * j + 2]) << 16 | int(b[4 * j + 3]) << 24
                        for j in range(4)]

            def z_of(gl, tile, lane):
                g = lane >> 2
                return ss[(gl * 2 + 1) * COLS + cw + tile * 8 + g] if P == 2 else zsym

            def flush(gl):
                for tile in range(2):
                    for lane in range(32):
                        t = lane & 3
                        base = gl * P * COLS + cw + tile * 8 + 2 * t
                        sx, sy = ss[base], ss[base + 1]
                        pt = part[tile][lane]
                        a = acc[tile][lane]
                        a[0] += pt[0] * sx
                        a[1] += pt[1] * sy
                        a[2] += pt[2] * sx
                        a[3] += pt[3] * sy
                        part[tile][lane] = [0.0] * 4

            def a_frag(lane, kl):
                g, t = lane >> 2, lane & 3
                c0 = kl + 2 * t
                if f32:
                    def f2(addr, ok):
                        return (xs[addr], xs[addr + 1]) if ok else (0.0, 0.0)
                    p = g * x_stride + c0
                    return [f2(p, g < mrows), f2(p + 8 * x_stride, g + 8 < mrows), f2(p + 8, g < mrows),
                            f2(p + 8 * x_stride + 8, g + 8 < mrows)]
                p = g * x_stride + (c0 >> 1)
                return [xs[p] if g < mrows else (0.0, 0.0), xs[p + 8 * x_stride] if g + 8 < mrows else (0.0, 0.0),
                        xs[p + 4] if g < mrows else (0.0, 0.0),
                        xs[p + 8 * x_stride + 4] if g + 8 < mrows else (0.0, 0.0)]

            def decode(q, z):
                if bits == 4:
                    return [(((q >> (4 * i)) & 0xF) - z, ((q >> (4 * i + 16)) & 0xF) - z) for i in range(4)]
                by_ = [(q >> (8 * i)) & 0xFF for i in range(4)]
                return [(by_[0] - z, by_[1] - z), (by_[2] - z, by_[3] - z)]

            for i in range(s_cnt):
                u = u_begin + i
                W = [[words(lane, i, tile) for lane in range(32)] for tile in range(2)]
                gl = min((u * KU) // gs, G - 1) - g_lo
                for j in range(4):
                    if per_word and j > 0:
                        gl = min((u * KU + j * KW) // gs, G - 1) - g_lo
                    kl = i * KU + j * KW
                    dec = [[decode(W[tile][lane][j], z_of(gl, tile, lane)) for lane in range(32)] for tile in range(2)]
                    steps = [(kl, 0)] + ([(kl + 16, 2)] if bits == 4 else [])
                    for k0, bi in steps:
                        A = [a_frag(lane, k0) for lane in range(32)]
                        for tile in range(2):
                            mma(part[tile], A, [(dec[tile][lane][bi], dec[tile][lane][bi + 1]) for lane in range(32)])
                    if per_word:
                        flush(gl)
                if not per_word:
                    flush(gl)
            for tile in range(2):
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    for r in range(4):
                        row, col = g + (8 if r >= 2 else 0), n_base + tile * 8 + 2 * t + (r & 1)
                        if row < mrows:
                            if splits == 1:
                                if col < N:
                                    y[m0 + row, col] = acc[tile][lane][r] + (bias[col] if bias is not None else 0.0)
                            else:
                                ws[by, m0 + row, col] = acc[tile][lane][r]
        if splits > 1:
            counters[bz, bx] += 1
            if counters[bz, bx] == splits:  # the emulation runs blocks in order: the last split is last
                for e in range(mrows * COLS):
                    row, c = divmod(e, COLS)
                    col = nb0 + c
                    if col >= N:
                        continue
                    v = sum(ws[s, m0 + row, col] for s in range(splits))
                    y[m0 + row, col] = v + (bias[col] if bias is not None else 0.0)
    return y, segs, splits


CASES = [  # (N, K), group size, asymmetric, M, forced segments (0: chosen), fp32 x
    ((300, 2000), 128, True, 3, 3, False), ((300, 2000), 32, False, 9, 0, True),
    ((300, 2000), 96, True, 16, 8, False), ((300, 2000), -1, False, 1, 1, True),
    ((130, 1000), 64, True, 2, 0, False), ((17, 300), 32, False, 16, 0, False),
    ((3, 17), -1, True, 1, 0, True), ((70, 160), 256, False, 7, 2, False),
    ((300, 2000), 64, True, 40, 3, False), ((130, 1000), -1, False, 64, 0, True),
    ((17, 300), 96, True, 33, 1, False),
]


def check_case(bits, N, K, gs, asym, M, segs, f32, gen):
    """Emulates one call on random checkpoint tensors; returns (max relative error against
    ref.qlinear_ref, segments used, splits). Raises if an output is left unwritten."""
    from test_qlinear import make_quantized  # noqa: E402

    qw, sc, z = make_quantized(N, K, bits, gs, asym, gen)
    w, ps = ref.repack_cuda_ref(qw, sc, z, bits, gs, K)
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    bias = torch.randn(N, generator=gen, dtype=torch.float64)
    y, s_used, splits = run(x, w, ps, bias.numpy(), bits, gs, N, K, segs, f32)
    wc, sbc = ref.repack_ref(qw, sc, z, bits, gs, K)
    want = ref.qlinear_ref(x, wc, sbc, bias, bits, gs, N, K).numpy()
    if np.isnan(y).any():
        raise AssertionError("unwritten outputs")
    return float(np.abs(y - want).max() / max(1e-12, np.abs(want).max())), s_used, splits


def main():
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for bits in (4, 8):
        for (N, K), gs, asym, M, segs, f32 in CASES:
            err, s_used, splits = check_case(bits, N, K, gs, asym, M, segs, f32, gen)
            worst = max(worst, err)
            print(f"w{bits} N={N} K={K} g{gs} asym={asym} M={M} segs={s_used} splits={splits} f32={f32}: "
                  f"max rel err {err:.2e}")
            assert err < 1e-5, "mismatch"
    print("all match; worst", worst)


if __name__ == "__main__":
    main()
