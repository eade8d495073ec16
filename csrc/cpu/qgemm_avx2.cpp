// AVX2 instance of the register-blocked fp32 GEMM of qlinear (qgemm_kernel.h): 8 floats per
// vector, 6 weight rows x 16 activation rows per micro-kernel call (12 accumulators, 2 x^T
// vectors and 1 broadcast weight fill the 16 ymm registers).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/qgemm_kernel.h"
#include "cpu/qlinear.h"
#include "cpu/simd_avx2.h"

namespace hfquant::cpu {
namespace {

using qgemm::kSlice;

// In-register transpose of 8 rows of 8 floats (r[i] holds row i; afterwards column i).
inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 4h .. 4h + 3
    u[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  // lane L of u[4h + j] holds column 4L + j of rows 4h .. 4h + 3
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

// 8 values of row `at` of x (dtype dt) as fp32; count < 8 reads only count values, the
// rest 0.
inline __m256 load8(const void* x, DType dt, int64_t at, int64_t count) {
  const size_t es = dt == DType::F32 ? 4 : 2;
  alignas(32) uint8_t tmp[32] = {};
  const uint8_t* src = static_cast<const uint8_t*>(x) + at * es;
  if (count < 8) {
    if (count > 0) std::memcpy(tmp, src, size_t(count) * es);
    src = tmp;
  }
  switch (dt) {
    case DType::F32: return _mm256_loadu_ps(reinterpret_cast<const float*>(src));
    case DType::BF16:
      return _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))), 16));
    default: return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
}

struct V256 {
  using vec = __m256;
  static constexpr int64_t kW = 8;
  static constexpr int kNR = 6;
  static vec zero() { return _mm256_setzero_ps(); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static vec set1(float v) { return _mm256_set1_ps(v); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, vec v) { _mm256_store_ps(p, v); }
  static void store4(const OutView& o, int64_t m, int64_t n0, int64_t valid, const float* v4) {
    cpu::store4(o, m, n0, valid, _mm_load_ps(v4));
  }
  static void dequant(const PackedView& p, void* w, DType wt, int64_t ldw, int64_t t0, int64_t t1) {
    dequant_tiles_avx2(p, w, wt, ldw, t0, t1);
  }
};

}  // namespace

// As transpose_x_avx512 (qlinear.h), in 8x8 blocks.
void transpose_x_avx2(const void* x, DType xt_dt, int64_t ldx, int64_t M, int64_t K, int64_t Kp, float* xt,
                      int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    float* dst = xt + c * Kp * kSlice;
    for (int64_t h = 0; h < kSlice; h += 8) {  // rows c*16 + h .. + 7
      const int64_t m0 = c * kSlice + h, rows = std::min<int64_t>(8, M - m0);
      for (int64_t k = 0; k < Kp; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i)
          r[i] = i < rows ? load8(x, xt_dt, (m0 + i) * ldx + k, std::min<int64_t>(8, K - k)) : _mm256_setzero_ps();
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (k + i) * kSlice + h, r[i]);
      }
    }
  }
}

void gemm_avx2(const PackedView& p, const float* xt, int64_t M, const OutView& o, int64_t t0, int64_t t1) {
  qgemm::gemm_tiles<V256>(p, xt, M, o, t0, t1);
}

}  // namespace hfquant::cpu
