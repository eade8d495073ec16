// AVX-512 GEMV kernels of qlinear (small M, the decode path).
//
//   gemv_avx512     : AVX-512 F/BW/VL/DQ; codes widened to fp32, FMA with fp32 x.
//   gemv_avx512bf16 : adds AVX512_BF16; 4-bit codes become the bf16 value 128 + v and
//                     vdpbf16ps multiplies them with x split into bf16 hi + lo.
//                     8-bit codes do not fit a bf16 mantissa: that case takes the fp32 path.
//
// Layout (qlinear.h): a 64-byte unit holds 4 rows, one row per 128-bit lane, so a zmm
// loaded from a unit keeps "lane r = row r" through every in-lane shuffle below. Each
// accumulator lane r then collects partial sums of row r; x is broadcast to the 4 lanes
// (vbroadcastf32x4 / vbroadcasti32x4, a plain load on current cores).
//
// Per group g the products are summed unscaled, then facc += s * acc (s expanded per
// lane) and the zero term corr[r] += sb[1][r] * X[m,g] is kept as 4 floats; the result is
// the horizontal sum of lane r minus corr[r].
//
// M > 1: the tile's units are decoded once per block of MB activation rows and reused
// for every m of the block; the blocks of one tile re-read its weights from L1/L2
// (a tile is Kp/2 or Kp bytes), so DRAM sees each weight byte once.
#include <immintrin.h>

#include <algorithm>

#include "cpu/qlinear.h"
#include "cpu/simd_avx512.h"

namespace hfquant::cpu {
namespace {

constexpr int kUnitBytes = 64;
// Software prefetch distance in bytes (0 = off); 2048 measured best of 0/512/1024/2048.
#ifndef HQ_PF
#define HQ_PF 2048
#endif
constexpr int kPrefetch = HQ_PF;

// [s0 s1 s2 s3] -> lanes: s0 x4 | s1 x4 | s2 x4 | s3 x4.
inline __m512 expand_rows(const float* s4) {
  const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(s4)));
}

// Sum of the 4 floats of each 128-bit lane: [sum lane0, sum lane1, sum lane2, sum lane3].
inline __m128 lane_sums(__m512 v) {
  const __m128 a0 = _mm512_castps512_ps128(v), a1 = _mm512_extractf32x4_ps(v, 1);
  const __m128 a2 = _mm512_extractf32x4_ps(v, 2), a3 = _mm512_extractf32x4_ps(v, 3);
  return _mm_hadd_ps(_mm_hadd_ps(a0, a1), _mm_hadd_ps(a2, a3));
}

template <int MB>
struct XRows {
  const float* x[MB];
  const uint16_t* hi[MB];
  const uint16_t* lo[MB];
};

// vpshufb control: dword d of each lane <- byte (4j + d) placed at byte position `pos`,
// the other three bytes zero (index 0x80).
inline __m512i byte_to_dword_ctrl(int j, int pos) {
  alignas(64) uint8_t c[64];
  for (int l = 0; l < 4; ++l)
    for (int d = 0; d < 4; ++d)
      for (int b = 0; b < 4; ++b) c[16 * l + 4 * d + b] = b == pos ? uint8_t(4 * j + d) : 0x80;
  return _mm512_load_si512(c);
}

// ---- decoders: one 64-byte unit -> products accumulated into acc[m][*] ----
//
// Each decoder has kUnitK (k values per unit) and step<MB, NA>(unit, xr, k, acc), where
// k is the unit's first k. Product j of a unit goes to accumulator j % NA: NA independent
// chains hide the FMA / dot-product latency when MB is small.

// 4-bit, fp32: vpshufb moves byte 4j+d of a lane to byte 2 of dword d; vpternlogd keeps
// one nibble there and ORs in 0x43000000, giving the float 0x43vv0000 = 128 + v without a
// conversion (the 128 is OFF of the layout; sb[1] = s (z + 128) removes it).
struct W4F32 {
  static constexpr int kUnitK = 32;
  struct Consts {
    __m512i ctrl[4], nib, bias;
    Consts() {
      for (int j = 0; j < 4; ++j) ctrl[j] = byte_to_dword_ctrl(j, 2);
      nib = _mm512_set1_epi32(0x000F0000);
      bias = _mm512_set1_epi32(0x43000000);
    }
  };
  template <int MB, int NA>
  static inline void step(const Consts& c, const uint8_t* w, const XRows<MB>& xr, int64_t k,
                          __m512 (&acc)[MB][NA]) {
    const __m512i v = _mm512_loadu_si512(w);
    const __m512i vh = _mm512_srli_epi16(v, 4);  // high nibble -> low nibble of the byte
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m512i t = _mm512_shuffle_epi8(j < 4 ? v : vh, c.ctrl[j & 3]);
      // (t & 0x000F0000) | 0x43000000: imm 0xEA = (A & B) | C
      const __m512 f = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(t, c.nib, c.bias, 0xEA));
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(xr.x[m] + k + 4 * j));
        acc[m][j % NA] = _mm512_fmadd_ps(f, xb, acc[m][j % NA]);
      }
    }
  }
};

// 8-bit, fp32: vpshufb zero-extends bytes 4j..4j+3 of each lane to dwords, vcvtdq2ps.
struct W8F32 {
  static constexpr int kUnitK = 16;
  struct Consts {
    __m512i ctrl[4];
    Consts() {
      for (int j = 0; j < 4; ++j) ctrl[j] = byte_to_dword_ctrl(j, 0);
    }
  };
  template <int MB, int NA>
  static inline void step(const Consts& c, const uint8_t* w, const XRows<MB>& xr, int64_t k,
                          __m512 (&acc)[MB][NA]) {
    const __m512i v = _mm512_loadu_si512(w);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 f = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(v, c.ctrl[j]));
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(xr.x[m] + k + 4 * j));
        acc[m][j % NA] = _mm512_fmadd_ps(f, xb, acc[m][j % NA]);
      }
    }
  }
};

// 4-bit, bf16: vpunpck{l,h}bw of the nibbles with 0x43 bytes gives words 0x43vv, the bf16
// value 128 + v exactly (7 mantissa bits hold v < 16). Lane r of the four words vectors
// holds k = 0..7, 8..15 (low nibbles) and 16..23, 24..31 (high nibbles) of row r, in the
// pair order vdpbf16ps uses, so x needs only a broadcast of 8 consecutive bf16 values.
// (128 + v) * hi and (128 + v) * lo are exact in fp32; kLo adds the second product when x
// was not bf16 already.
template <bool kLo>
struct W4Bf16 {
  static constexpr int kUnitK = 32;
  struct Consts {
    __m512i nib, c43;
    Consts() : nib(_mm512_set1_epi8(0x0F)), c43(_mm512_set1_epi8(0x43)) {}
  };
  template <int MB, int NA>
  static inline void step(const Consts& c, const uint8_t* w, const XRows<MB>& xr, int64_t k,
                          __m512 (&acc)[MB][NA]) {
    const __m512i v = _mm512_loadu_si512(w);
    const __m512i L = _mm512_and_si512(v, c.nib);
    const __m512i H = _mm512_and_si512(_mm512_srli_epi16(v, 4), c.nib);
    const __m512bh wv[4] = {(__m512bh)_mm512_unpacklo_epi8(L, c.c43), (__m512bh)_mm512_unpackhi_epi8(L, c.c43),
                            (__m512bh)_mm512_unpacklo_epi8(H, c.c43), (__m512bh)_mm512_unpackhi_epi8(H, c.c43)};
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m512bh xh = (__m512bh)_mm512_broadcast_i32x4(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(xr.hi[m] + k + 8 * i)));
        acc[m][i % NA] = _mm512_dpbf16_ps(acc[m][i % NA], wv[i], xh);
        if constexpr (kLo) {
          const __m512bh xl = (__m512bh)_mm512_broadcast_i32x4(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(xr.lo[m] + k + 8 * i)));
          acc[m][(i + 4) % NA] = _mm512_dpbf16_ps(acc[m][(i + 4) % NA], wv[i], xl);
        }
      }
    }
  }
};

// TT consecutive tiles (4 rows each) against activation rows [m0, m0 + MB). With TT > 1
// the tiles advance through k together, so the x values a unit needs are fetched into L1
// once for all TT tiles instead of once per tile (x of a 11008-wide layer does not fit L1
// beside the weight stream).
template <class D, int MB, int NA, int TT>
inline void tile_rows(const typename D::Consts& c, const PackedView& p, const ActView& a, const OutView& o,
                      int64_t m0, int64_t t) {
  const int64_t U = p.Kp / D::kUnitK, upg = p.gs / D::kUnitK;
  const uint8_t* wt = p.w + t * U * kUnitBytes;
  const float* sbt = p.sb + t * p.G * 2 * kNR;
  XRows<MB> xr;
  for (int m = 0; m < MB; ++m) {
    xr.x[m] = a.x + (m0 + m) * p.Kp;
    xr.hi[m] = a.xhi ? a.xhi + (m0 + m) * p.Kp : nullptr;
    xr.lo[m] = a.xlo ? a.xlo + (m0 + m) * p.Kp : nullptr;
  }
  __m512 facc[TT][MB];
  __m128 corr[TT][MB];
  for (int tt = 0; tt < TT; ++tt)
    for (int m = 0; m < MB; ++m) {
      facc[tt][m] = _mm512_setzero_ps();
      corr[tt][m] = _mm_setzero_ps();
    }
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t u0 = g * upg, u1 = std::min(U, u0 + upg);
    __m512 acc[TT][MB][NA];
    for (int tt = 0; tt < TT; ++tt)
      for (int m = 0; m < MB; ++m)
        for (int i = 0; i < NA; ++i) acc[tt][m][i] = _mm512_setzero_ps();
    for (int64_t u = u0; u < u1; ++u) {
#pragma GCC unroll 4
      for (int tt = 0; tt < TT; ++tt) {
        const uint8_t* wu = wt + (tt * U + u) * kUnitBytes;
        // Each tile is a contiguous stream; a software prefetch 2 KiB ahead keeps more
        // lines in flight than the L2 streamer alone does at M = 1.
        if (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(wu) + kPrefetch, _MM_HINT_T0);
        D::template step<MB, NA>(c, wu, xr, u * D::kUnitK, acc[tt]);
      }
    }
    for (int tt = 0; tt < TT; ++tt) {
      const float* sbg = sbt + (tt * p.G + g) * 2 * kNR;
      const __m512 s = expand_rows(sbg);
      const __m128 sz = _mm_loadu_ps(sbg + kNR);
      for (int m = 0; m < MB; ++m) {
        __m512 sum = acc[tt][m][0];
        for (int i = 1; i < NA; ++i) sum = _mm512_add_ps(sum, acc[tt][m][i]);
        facc[tt][m] = _mm512_fmadd_ps(sum, s, facc[tt][m]);
        corr[tt][m] = _mm_fmadd_ps(sz, _mm_set1_ps(a.xs[(m0 + m) * p.G + g]), corr[tt][m]);
      }
    }
  }
  for (int tt = 0; tt < TT; ++tt) {
    // Rows >= N of the last tile exist only as padding: never store them.
    const int64_t valid = std::min<int64_t>(kNR, p.N - (t + tt) * kNR);
    for (int m = 0; m < MB; ++m)
      store4(o, m0 + m, (t + tt) * kNR, valid, _mm_sub_ps(lane_sums(facc[tt][m]), corr[tt][m]));
  }
}

// Accumulator counts: enough independent chains per m that MB * NA >= 8 (8 = about
// latency x throughput of FMA / vdpbf16ps), without running out of the 32 zmm registers.
template <class D>
void gemv_tiles(const PackedView& p, const ActView& a, const OutView& o, int64_t t0, int64_t t1) {
  const typename D::Consts c;
  if (a.M == 1) {
    // Decode: 4 tiles (16 rows) at a time share each x load.
    int64_t t = t0;
    for (; t + 4 <= t1; t += 4) tile_rows<D, 1, 2, 4>(c, p, a, o, 0, t);
    for (; t < t1; ++t) tile_rows<D, 1, 8, 1>(c, p, a, o, 0, t);
    return;
  }
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) tile_rows<D, 4, 2, 1>(c, p, a, o, m, t);
    if (m + 2 <= a.M) {
      tile_rows<D, 2, 4, 1>(c, p, a, o, m, t);
      m += 2;
    }
    if (m < a.M) tile_rows<D, 1, 8, 1>(c, p, a, o, m, t);
  }
}

}  // namespace

void gemv_avx512(const PackedView& p, const ActView& a, const OutView& o, int64_t t0, int64_t t1) {
  if (p.bits == 4)
    gemv_tiles<W4F32>(p, a, o, t0, t1);
  else
    gemv_tiles<W8F32>(p, a, o, t0, t1);
}

void gemv_avx512bf16(const PackedView& p, const ActView& a, const OutView& o, int64_t t0, int64_t t1) {
  if (p.bits != 4)
    gemv_tiles<W8F32>(p, a, o, t0, t1);
  else if (a.has_lo)
    gemv_tiles<W4Bf16<true>>(p, a, o, t0, t1);
  else
    gemv_tiles<W4Bf16<false>>(p, a, o, t0, t1);
}

// Activation rows -> fp32 zero-padded rows, group sums and (split) the bf16 hi/lo pair.
void prepare_avx512(const void* x, DType xt, int64_t ldx, int64_t M, const PackedView& p, bool split,
                    float* xo, float* xs, uint16_t* xhi, uint16_t* xlo) {
  for (int64_t m = 0; m < M; ++m) {
    float* row = xo + m * p.Kp;
    __m512 gsum = _mm512_setzero_ps();
    // gs is a multiple of 32, so every group boundary falls on a 16-wide step.
    for (int64_t k = 0, g = 0; k < p.Kp; k += 16) {
      const int64_t left = p.K - k;
      const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : 0;
      __m512 v;
      __m256i raw = _mm256_setzero_si256();
      switch (xt) {
        case DType::F32: v = _mm512_maskz_loadu_ps(mask, static_cast<const float*>(x) + m * ldx + k); break;
        case DType::BF16:
          raw = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + m * ldx + k);
          v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
          break;
        default:
          v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + m * ldx + k));
      }
      _mm512_storeu_ps(row + k, v);
      if (split) {
        // x = hi + lo, both bf16: (128 + v) * hi and (128 + v) * lo are exact in fp32.
        // The group sum takes hi + lo so the zero term cancels exactly what the dot
        // products saw (the residual x - hi - lo is below 2^-16 |x|).
        const __m256i hi = xt == DType::BF16 ? raw : bf16_round(v);
        const __m512 hif = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
        const __m256i lo = xt == DType::BF16 ? _mm256_setzero_si256() : bf16_round(_mm512_sub_ps(v, hif));
        const __m512 lof = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(lo), 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xhi + m * p.Kp + k), hi);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xlo + m * p.Kp + k), lo);
        gsum = _mm512_add_ps(gsum, _mm512_add_ps(hif, lof));
      } else {
        gsum = _mm512_add_ps(gsum, v);
      }
      if ((k + 16) % p.gs == 0 || k + 16 == p.Kp) {
        xs[m * p.G + g++] = _mm512_reduce_add_ps(gsum);
        gsum = _mm512_setzero_ps();
      }
    }
  }
}

// Tiles -> rows of (v - z) s, fp32 or bf16. Row r of a unit is one 16-byte lane:
// vpmovzxbd widens it to 16 dwords (k = 16u'.. for 8-bit; for 4-bit the low nibbles are
// k = 32u + 0..15 and the high nibbles k = 32u + 16..31). Writes k < Kp: ldw >= Kp.
void dequant_tiles_avx512(const PackedView& p, void* w_out, DType wt, int64_t ldw, int64_t t0, int64_t t1) {
  const int64_t unit_k = p.bits == 4 ? 32 : 16, U = p.Kp / unit_k, upg = p.gs / unit_k;
  const __m512i nib = _mm512_set1_epi32(0x0F);
  auto put = [&](int64_t at, __m512 w) {
    if (wt == DType::BF16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(w_out) + at), bf16_round(w));
    else
      _mm512_storeu_ps(static_cast<float*>(w_out) + at, w);
  };
  for_each_row_group(p, ldw, t0, t1, [&](int64_t row, int64_t t, int64_t r, int64_t g, float sc, float scz) {
    const __m512 s = _mm512_set1_ps(sc), sz = _mm512_set1_ps(scz);
    const uint8_t* wt_ = p.w + t * U * kUnitBytes;
    const int64_t u1 = std::min(U, (g + 1) * upg);
    for (int64_t u = g * upg; u < u1; ++u) {
      const __m512i b =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wt_ + u * kUnitBytes + r * 16)));
      if (p.bits == 4) {
        put(row + 32 * u, _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, nib)), s, sz));
        put(row + 32 * u + 16, _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), s, sz));
      } else {
        put(row + 16 * u, _mm512_fmsub_ps(_mm512_cvtepi32_ps(b), s, sz));
      }
    }
  });
}

}  // namespace hfquant::cpu
