// AVX2 + FMA GEMV kernels of qlinear (small M, the decode path), for CPUs without AVX-512.
//
// Layout (qlinear.h): a 64-byte unit holds 4 rows, one row per 128-bit lane; a unit is
// two ymm here, rows {0, 1} and rows {2, 3}, and every shuffle below stays in its lane,
// so accumulator lane r keeps collecting partial sums of row r. x is broadcast to both
// lanes (vbroadcastf128, a load-port operation).
//
// Codes become fp32 without vcvtdq2ps: vpshufb puts the code byte at byte 2 of a dword,
// OR 0x43000000 makes the float 0x43vv0000 = 128 + v (4-bit; the 128 is OFF of the
// layout, removed by sb[1] = s (z + 128)); 8-bit codes are zero-extended to dwords by
// vpshufb and converted (OFF = 0).
//
// Per group g the products are summed unscaled, then facc += s * acc with s expanded per
// lane, and the zero term corr[r] += sb[1][r] * X[m,g]; the result is the horizontal sum
// of lane r minus corr[r]. With M > 1 a unit is decoded once per block of MB activation
// rows; the blocks of one tile re-read its weights from L1/L2, not DRAM.
#include <immintrin.h>

#include <algorithm>

#include "cpu/qlinear.h"
#include "cpu/simd_avx2.h"

namespace hfquant::cpu {
namespace {

constexpr int kUnitBytes = 64;

// [s0 s1 s2 s3] -> (s0 x4 | s1 x4), (s2 x4 | s3 x4)
inline void expand_rows(const float* s4, __m256& s01, __m256& s23) {
  const __m256 s = _mm256_castps128_ps256(_mm_loadu_ps(s4));
  s01 = _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  s23 = _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3));
}

// [sum lane0 of a, sum lane1 of a, sum lane0 of b, sum lane1 of b]
inline __m128 lane_sums(__m256 a, __m256 b) {
  const __m128 a0 = _mm256_castps256_ps128(a), a1 = _mm256_extractf128_ps(a, 1);
  const __m128 b0 = _mm256_castps256_ps128(b), b1 = _mm256_extractf128_ps(b, 1);
  return _mm_hadd_ps(_mm_hadd_ps(a0, a1), _mm_hadd_ps(b0, b1));
}

// vpshufb control: dword d of each lane <- byte (4j + d) at byte position `pos`, others 0.
inline __m256i byte_to_dword_ctrl(int j, int pos) {
  alignas(32) uint8_t c[32];
  for (int l = 0; l < 2; ++l)
    for (int d = 0; d < 4; ++d)
      for (int b = 0; b < 4; ++b) c[16 * l + 4 * d + b] = b == pos ? uint8_t(4 * j + d) : 0x80;
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(c));
}

template <int MB>
struct XRows {
  const float* x[MB];
};

// Decoders: kUnitK k values per unit; step<MB, NA> adds the unit's products into
// acc[m][h][j % NA] (h = ymm half: rows 0-1 or 2-3), NA chains to hide FMA latency.

// 4-bit: the two nibbles of byte b are k = b (low) and k = 16 + b (high).
struct W4 {
  static constexpr int kUnitK = 32;
  struct Consts {
    __m256i ctrl[4], nib, bias;
    Consts() {
      for (int j = 0; j < 4; ++j) ctrl[j] = byte_to_dword_ctrl(j, 2);
      nib = _mm256_set1_epi8(0x0F);
      bias = _mm256_set1_epi32(0x43000000);
    }
  };
  template <int MB, int NA>
  static inline void step(const Consts& c, const uint8_t* w, const XRows<MB>& xr, int64_t k,
                          __m256 (&acc)[MB][2][NA]) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h));
      const __m256i L = _mm256_and_si256(v, c.nib);
      const __m256i H = _mm256_and_si256(_mm256_srli_epi16(v, 4), c.nib);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m256 f =
            _mm256_castsi256_ps(_mm256_or_si256(_mm256_shuffle_epi8(j < 4 ? L : H, c.ctrl[j & 3]), c.bias));
#pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) {
          const __m256 xb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xr.x[m] + k + 4 * j));
          acc[m][h][j % NA] = _mm256_fmadd_ps(f, xb, acc[m][h][j % NA]);
        }
      }
    }
  }
};

// 8-bit: byte b of a row is k = b.
struct W8 {
  static constexpr int kUnitK = 16;
  struct Consts {
    __m256i ctrl[4];
    Consts() {
      for (int j = 0; j < 4; ++j) ctrl[j] = byte_to_dword_ctrl(j, 0);
    }
  };
  template <int MB, int NA>
  static inline void step(const Consts& c, const uint8_t* w, const XRows<MB>& xr, int64_t k,
                          __m256 (&acc)[MB][2][NA]) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h));
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256 f = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, c.ctrl[j]));
#pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) {
          const __m256 xb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xr.x[m] + k + 4 * j));
          acc[m][h][j % NA] = _mm256_fmadd_ps(f, xb, acc[m][h][j % NA]);
        }
      }
    }
  }
};

template <class D, int MB, int NA>
inline void tile_rows(const typename D::Consts& c, const PackedView& p, const ActView& a, const OutView& o,
                      int64_t m0, int64_t t) {
  const int64_t U = p.Kp / D::kUnitK, upg = p.gs / D::kUnitK;
  const uint8_t* wt = p.w + t * U * kUnitBytes;
  const float* sbt = p.sb + t * p.G * 2 * kNR;
  XRows<MB> xr;
  for (int m = 0; m < MB; ++m) xr.x[m] = a.x + (m0 + m) * p.Kp;
  __m256 facc[MB][2];
  __m128 corr[MB];
  for (int m = 0; m < MB; ++m) {
    facc[m][0] = facc[m][1] = _mm256_setzero_ps();
    corr[m] = _mm_setzero_ps();
  }
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t u0 = g * upg, u1 = std::min(U, u0 + upg);
    __m256 acc[MB][2][NA];
    for (int m = 0; m < MB; ++m)
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < NA; ++i) acc[m][h][i] = _mm256_setzero_ps();
    const uint8_t* wu = wt + u0 * kUnitBytes;
    for (int64_t u = u0; u < u1; ++u, wu += kUnitBytes) D::template step<MB, NA>(c, wu, xr, u * D::kUnitK, acc);
    __m256 s01, s23;
    expand_rows(sbt + g * 2 * kNR, s01, s23);
    const __m128 sz = _mm_loadu_ps(sbt + g * 2 * kNR + kNR);
    for (int m = 0; m < MB; ++m) {
      __m256 a01 = acc[m][0][0], a23 = acc[m][1][0];
      for (int i = 1; i < NA; ++i) {
        a01 = _mm256_add_ps(a01, acc[m][0][i]);
        a23 = _mm256_add_ps(a23, acc[m][1][i]);
      }
      facc[m][0] = _mm256_fmadd_ps(a01, s01, facc[m][0]);
      facc[m][1] = _mm256_fmadd_ps(a23, s23, facc[m][1]);
      corr[m] = _mm_fmadd_ps(sz, _mm_set1_ps(a.xs[(m0 + m) * p.G + g]), corr[m]);
    }
  }
  // Rows >= N of the last tile exist only as padding: never store them.
  const int64_t valid = std::min<int64_t>(kNR, p.N - t * kNR);
  for (int m = 0; m < MB; ++m)
    store4(o, m0 + m, t * kNR, valid, _mm_sub_ps(lane_sums(facc[m][0], facc[m][1]), corr[m]));
}

// 16 ymm registers: MB * 2 * NA accumulators plus decode temporaries must fit.
template <class D>
void gemv_tiles(const PackedView& p, const ActView& a, const OutView& o, int64_t t0, int64_t t1) {
  const typename D::Consts c;
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = 0;
    for (; m + 2 <= a.M; m += 2) tile_rows<D, 2, 2>(c, p, a, o, m, t);
    if (m < a.M) tile_rows<D, 1, 4>(c, p, a, o, m, t);
  }
}

}  // namespace

void gemv_avx2(const PackedView& p, const ActView& a, const OutView& o, int64_t t0, int64_t t1) {
  if (p.bits == 4)
    gemv_tiles<W4>(p, a, o, t0, t1);
  else
    gemv_tiles<W8>(p, a, o, t0, t1);
}

// Activation rows -> fp32 zero-padded rows and group sums (no bf16 split on this path).
void prepare_avx2(const void* x, DType xt, int64_t ldx, int64_t M, const PackedView& p, bool /*split*/, float* xo,
                  float* xs, uint16_t* /*xhi*/, uint16_t* /*xlo*/) {
  for (int64_t m = 0; m < M; ++m) {
    float* row = xo + m * p.Kp;
    __m256 gsum = _mm256_setzero_ps();
    // gs is a multiple of 32, so every group boundary falls on an 8-wide step.
    for (int64_t k = 0, g = 0; k < p.Kp; k += 8) {
      const int64_t left = p.K - k;
      const int64_t i = m * ldx + k;
      __m256 v;
      if (left >= 8) {
        switch (xt) {
          case DType::F32: v = _mm256_loadu_ps(static_cast<const float*>(x) + i); break;
          case DType::BF16:
            v = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                    static_cast<const uint16_t*>(x) + i))), 16));
            break;
          default:
            v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
        }
      } else {
        // Tail: gather what is left through a zeroed buffer (no read past the row).
        alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        alignas(16) uint16_t h[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t j = 0; j < left; ++j) {
          if (xt == DType::F32)
            tmp[j] = static_cast<const float*>(x)[i + j];
          else
            h[j] = static_cast<const uint16_t*>(x)[i + j];
        }
        const __m128i hv = _mm_load_si128(reinterpret_cast<const __m128i*>(h));
        v = xt == DType::F32    ? _mm256_load_ps(tmp)
            : xt == DType::BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(hv), 16))
                                : _mm256_cvtph_ps(hv);
      }
      _mm256_storeu_ps(row + k, v);
      gsum = _mm256_add_ps(gsum, v);
      if ((k + 8) % p.gs == 0 || k + 8 == p.Kp) {
        const __m128 q = _mm_add_ps(_mm256_castps256_ps128(gsum), _mm256_extractf128_ps(gsum, 1));
        const __m128 h2 = _mm_add_ps(q, _mm_movehl_ps(q, q));
        xs[m * p.G + g++] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
        gsum = _mm256_setzero_ps();
      }
    }
  }
}

// Tiles -> rows of (v - z) s, fp32 or bf16. Row r of a unit is one 16-byte lane;
// vpmovzxbd widens 8 bytes at a time to dwords. Writes k < Kp: ldw >= Kp.
void dequant_tiles_avx2(const PackedView& p, void* w_out, DType wt, int64_t ldw, int64_t t0, int64_t t1) {
  const int64_t unit_k = p.bits == 4 ? 32 : 16, U = p.Kp / unit_k, upg = p.gs / unit_k;
  const __m256i nib = _mm256_set1_epi32(0x0F);
  auto put = [&](int64_t at, __m256 w) {
    if (wt == DType::BF16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(w_out) + at), pack_dw16(bf16_round_dw(w)));
    else
      _mm256_storeu_ps(static_cast<float*>(w_out) + at, w);
  };
  for_each_row_group(p, ldw, t0, t1, [&](int64_t row, int64_t t, int64_t r, int64_t g, float sc, float scz) {
    const __m256 s = _mm256_set1_ps(sc), sz = _mm256_set1_ps(scz);
    const uint8_t* wt_ = p.w + t * U * kUnitBytes;
    const int64_t u1 = std::min(U, (g + 1) * upg);
    for (int64_t u = g * upg; u < u1; ++u) {
      const uint8_t* src = wt_ + u * kUnitBytes + r * 16;
      for (int half = 0; half < 2; ++half) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 8 * half)));
        if (p.bits == 4) {
          put(row + 32 * u + 8 * half, _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, nib)), s, sz));
          put(row + 32 * u + 16 + 8 * half, _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), s, sz));
        } else {
          put(row + 16 * u + 8 * half, _mm256_fmsub_ps(_mm256_cvtepi32_ps(b), s, sz));
        }
      }
    }
  });
}

}  // namespace hfquant::cpu
