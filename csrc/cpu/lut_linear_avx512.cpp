// AVX-512 kernels of lut_linear (layout in lut_linear.h).
//
// Decode: a row's 16-byte unit -> vpmovzxbd -> 16 dword lanes whose low nibble is the index
// of k = 32u + 0..15; vpermps (_mm512_permutexvar_ps) looks all 16 up at once in the
// row-group's codebook, which fills one zmm (it reads only bits 3:0 of each lane, so the
// high nibble needs no mask); the same lanes shifted right by 4 give k = 32u + 16..31.
// Two shuffle-port ops and one shift per 32 weights, then FMA with fp32 x.
//
// Blocking: RB = 4 rows x MB <= 4 activation rows per pass; the 4 rows' decoded weights
// (8 zmm) are reused for every m, each (m, row) pair keeps one accumulator (16 zmm), and
// the 4 codebooks (4 zmm) stay in registers for a whole group. The 4 rows of a block
// (Kp / 2 bytes each) stay in L1 while further m blocks re-read them, so DRAM sees each
// index byte once per call.
#include <immintrin.h>

#include <algorithm>

#include "cpu/lut_linear.h"

namespace hfquant::cpu {
namespace {

template <int RB, int MB>
inline void block(const LutView& p, const float* x, int64_t m0, float* y, int64_t ldy, const float* bias,
                  int64_t n) {
  const int64_t row_bytes = p.Kp / 2, U = p.Kp / kLutUnitK, upg = p.gs / kLutUnitK;
  __m512 acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint8_t* w[RB];
  for (int r = 0; r < RB; ++r) w[r] = p.idx + (n + r) * row_bytes;
  const float* xm[MB];
  for (int m = 0; m < MB; ++m) xm[m] = x + (m0 + m) * p.Kp;
  for (int64_t g = 0; g < p.G; ++g) {
    __m512 tab[RB];
    for (int r = 0; r < RB; ++r) tab[r] = _mm512_loadu_ps(p.tab + ((n + r) * p.G + g) * kLutTable);
    const int64_t u1 = std::min(U, (g + 1) * upg);
    for (int64_t u = g * upg; u < u1; ++u) {
      __m512 wl[RB], wh[RB];
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        const __m512i iv = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + u * 16)));
        wl[r] = _mm512_permutexvar_ps(iv, tab[r]);
        wh[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(iv, 4), tab[r]);
      }
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        const __m512 xl = _mm512_loadu_ps(xm[m] + u * kLutUnitK);
        const __m512 xh = _mm512_loadu_ps(xm[m] + u * kLutUnitK + 16);
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) {
          acc[m][r] = _mm512_fmadd_ps(wl[r], xl, acc[m][r]);
          acc[m][r] = _mm512_fmadd_ps(wh[r], xh, acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) {
      const float v = _mm512_reduce_add_ps(acc[m][r]);
      y[(m0 + m) * ldy + n + r] = bias ? v + bias[n + r] : v;
    }
}

template <int RB>
inline void rows_all_m(const LutView& p, const float* x, int64_t M, float* y, int64_t ldy, const float* bias,
                       int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block<RB, 4>(p, x, m, y, ldy, bias, n);
  switch (M - m) {
    case 3: block<RB, 3>(p, x, m, y, ldy, bias, n); break;
    case 2: block<RB, 2>(p, x, m, y, ldy, bias, n); break;
    case 1: block<RB, 1>(p, x, m, y, ldy, bias, n); break;
    default: break;
  }
}

}  // namespace

void lut_gemv_avx512(const LutView& p, const float* x, int64_t M, float* y, int64_t ldy, const float* bias,
                     int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) rows_all_m<4>(p, x, M, y, ldy, bias, n);
  switch (n1 - n) {
    case 3: rows_all_m<3>(p, x, M, y, ldy, bias, n); break;
    case 2: rows_all_m<2>(p, x, M, y, ldy, bias, n); break;
    case 1: rows_all_m<1>(p, x, M, y, ldy, bias, n); break;
    default: break;
  }
}

void lut_dequant_avx512(const LutView& p, float* w, int64_t ldw, int64_t n0, int64_t n1) {
  const int64_t row_bytes = p.Kp / 2, U = p.Kp / kLutUnitK, upg = p.gs / kLutUnitK;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.idx + n * row_bytes;
    float* out = w + (n - n0) * ldw;
    for (int64_t g = 0; g < p.G; ++g) {
      const __m512 tab = _mm512_loadu_ps(p.tab + (n * p.G + g) * kLutTable);
      const int64_t u1 = std::min(U, (g + 1) * upg);
      for (int64_t u = g * upg; u < u1; ++u) {
        const __m512i iv = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + u * 16)));
        _mm512_storeu_ps(out + u * kLutUnitK, _mm512_permutexvar_ps(iv, tab));
        _mm512_storeu_ps(out + u * kLutUnitK + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(iv, 4), tab));
      }
    }
  }
}

}  // namespace hfquant::cpu
