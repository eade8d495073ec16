// AVX-512 instance of the register-blocked fp32 GEMM of qlinear (qgemm_kernel.h): 16 floats
// per vector, 12 weight rows x 32 activation rows per micro-kernel call (24 accumulators).
// At M = 128 it runs near the FMA peak (docs/benchmarks.md); the GEMV kernels keep one
// x load per FMA and stay near half of it.
#include <immintrin.h>

#include <algorithm>

#include "cpu/qgemm_kernel.h"
#include "cpu/qlinear.h"
#include "cpu/simd_avx512.h"

namespace hfquant::cpu {
namespace {

using qgemm::kSlice;

// In-register transpose of 16 rows of 16 floats (r[i] holds row i; afterwards column i).
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  // lane L of r[4i + j] now holds column 4L + j of rows 4i .. 4i + 3
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
  }
}

struct V512 {
  using vec = __m512;
  static constexpr int64_t kW = 16;
  static constexpr int kNR = 12;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec set1(float v) { return _mm512_set1_ps(v); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, vec v) { _mm512_store_ps(p, v); }
  static void store4(const OutView& o, int64_t m, int64_t n0, int64_t valid, const float* v4) {
    cpu::store4(o, m, n0, valid, _mm_load_ps(v4));
  }
  static void dequant(const PackedView& p, void* w, DType wt, int64_t ldw, int64_t t0, int64_t t1) {
    dequant_tiles_avx512(p, w, wt, ldw, t0, t1);
  }
};

}  // namespace

// x: [M][K] of dtype xt, row stride ldx elements -> xt: [ceil(M/16)][Kp][16] fp32, zero for
// m >= M and k >= K; slices [c0, c1).
void transpose_x_avx512(const void* x, DType xt_dt, int64_t ldx, int64_t M, int64_t K, int64_t Kp, float* xt,
                        int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t m0 = c * kSlice, rows = std::min(kSlice, M - m0);
    float* dst = xt + c * Kp * kSlice;
    for (int64_t k = 0; k < Kp; k += 16) {
      const int64_t left = K - k;
      const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : 0;
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        if (i >= rows) {
          r[i] = _mm512_setzero_ps();
          continue;
        }
        const int64_t at = (m0 + i) * ldx + k;
        switch (xt_dt) {
          case DType::F32: r[i] = _mm512_maskz_loadu_ps(mask, static_cast<const float*>(x) + at); break;
          case DType::BF16:
            r[i] = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + at)), 16));
            break;
          default: r[i] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + at));
        }
      }
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + (k + i) * kSlice, r[i]);
    }
  }
}

void gemm_avx512(const PackedView& p, const float* xt, int64_t M, const OutView& o, int64_t t0, int64_t t1) {
  qgemm::gemm_tiles<V512>(p, xt, M, o, t0, t1);
}

}  // namespace hfquant::cpu
