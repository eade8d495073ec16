// AVX2 kernels of lut_linear (layout in lut_linear.h).
//
// A 16-entry codebook is two ymm halves (entries 0-7, 8-15). vpermps
// (_mm256_permutevar8x32_ps) looks 8 indices up in each half using bits 2:0 of each lane;
// vblendvps picks the half by the lane's sign bit, which is index bit 3 after a left shift
// by 28 (that shift also drops the other nibble of the byte). Per 32 weights of a row:
// two vpmovzxbd (8 bytes each), four lookups of 2 permutes + 1 blend, 4 FMA per m.
// RB = 2 rows x MB <= 2 activation rows per pass: 4 accumulators, 4 codebook halves and
// the decoded weights of one row (4 ymm) fit the 16 registers.
#include <immintrin.h>

#include <algorithm>

#include "cpu/lut_linear.h"

namespace hfquant::cpu {
namespace {

struct Tab {
  __m256 lo, hi;
};

inline __m256 lookup(const Tab& t, __m256i iv) {
  const __m256 a = _mm256_permutevar8x32_ps(t.lo, iv);
  const __m256 b = _mm256_permutevar8x32_ps(t.hi, iv);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(iv, 28)));
}

// The 32 weights of unit u of a row: k = 32u + 0..7, 8..15, 16..23, 24..31.
inline void decode(const Tab& t, const uint8_t* unit, __m256 (&wv)[4]) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(unit));
  const __m256i i0 = _mm256_cvtepu8_epi32(b);
  const __m256i i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
  wv[0] = lookup(t, i0);
  wv[1] = lookup(t, i1);
  wv[2] = lookup(t, _mm256_srli_epi32(i0, 4));
  wv[3] = lookup(t, _mm256_srli_epi32(i1, 4));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int RB, int MB>
inline void block(const LutView& p, const float* x, int64_t m0, float* y, int64_t ldy, const float* bias,
                  int64_t n) {
  const int64_t row_bytes = p.Kp / 2, U = p.Kp / kLutUnitK, upg = p.gs / kLutUnitK;
  __m256 acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    Tab tab[RB];
    for (int r = 0; r < RB; ++r) {
      const float* t = p.tab + ((n + r) * p.G + g) * kLutTable;
      tab[r] = {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)};
    }
    const int64_t u1 = std::min(U, (g + 1) * upg);
    for (int64_t u = g * upg; u < u1; ++u) {
#pragma GCC unroll 2
      for (int r = 0; r < RB; ++r) {
        __m256 wv[4];
        decode(tab[r], p.idx + (n + r) * row_bytes + u * 16, wv);
#pragma GCC unroll 2
        for (int m = 0; m < MB; ++m) {
          const float* xk = x + (m0 + m) * p.Kp + u * kLutUnitK;
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) acc[m][r] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xk + 8 * j), acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) {
      const float v = hsum(acc[m][r]);
      y[(m0 + m) * ldy + n + r] = bias ? v + bias[n + r] : v;
    }
}

template <int RB>
inline void rows_all_m(const LutView& p, const float* x, int64_t M, float* y, int64_t ldy, const float* bias,
                       int64_t n) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) block<RB, 2>(p, x, m, y, ldy, bias, n);
  if (m < M) block<RB, 1>(p, x, m, y, ldy, bias, n);
}

}  // namespace

void lut_gemv_avx2(const LutView& p, const float* x, int64_t M, float* y, int64_t ldy, const float* bias,
                   int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) rows_all_m<2>(p, x, M, y, ldy, bias, n);
  if (n < n1) rows_all_m<1>(p, x, M, y, ldy, bias, n);
}

void lut_dequant_avx2(const LutView& p, float* w, int64_t ldw, int64_t n0, int64_t n1) {
  const int64_t row_bytes = p.Kp / 2, U = p.Kp / kLutUnitK, upg = p.gs / kLutUnitK;
  for (int64_t n = n0; n < n1; ++n) {
    float* out = w + (n - n0) * ldw;
    for (int64_t g = 0; g < p.G; ++g) {
      const float* t = p.tab + (n * p.G + g) * kLutTable;
      const Tab tab{_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)};
      const int64_t u1 = std::min(U, (g + 1) * upg);
      for (int64_t u = g * upg; u < u1; ++u) {
        __m256 wv[4];
        decode(tab, p.idx + n * row_bytes + u * 16, wv);
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + u * kLutUnitK + 8 * j, wv[j]);
      }
    }
  }
}

}  // namespace hfquant::cpu
