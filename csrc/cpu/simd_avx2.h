// Small AVX2 helpers shared by the kernels compiled with AVX2 flags. Include only from
// those files (they are entered after a run-time CPU feature check).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/qlinear.h"  // OutView

namespace hfquant::cpu {
inline namespace avx2 {

// fp32 -> bf16 bit patterns in the low 16 bits of each dword, round to nearest even,
// NaN kept NaN (as c10::BFloat16 does).
inline __m256i bf16_round_dw(__m256 y) {
  const __m256i u = _mm256_castps_si256(y);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
}

// 8 dwords holding 16-bit values -> 8 packed uint16 in a __m128i.
inline __m128i pack_dw16(__m256i r) {
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// y[m][n0 .. n0 + valid) = v (+ bias), converted to the output dtype.
inline void store4(const OutView& o, int64_t m, int64_t n0, int64_t valid, __m128 v) {
  alignas(16) float tmp[4];
  if (o.bias) {
    if (valid == 4) {
      v = _mm_add_ps(v, _mm_loadu_ps(o.bias + n0));
    } else {
      for (int r = 0; r < 4; ++r) tmp[r] = r < valid ? o.bias[n0 + r] : 0.f;
      v = _mm_add_ps(v, _mm_load_ps(tmp));
    }
  }
  const int64_t i = m * o.ldy + n0;
  alignas(16) uint16_t h[8];
  switch (o.dt) {
    case DType::F32:
      if (valid == 4) {
        _mm_storeu_ps(static_cast<float*>(o.y) + i, v);
        return;
      }
      _mm_store_ps(tmp, v);
      for (int64_t r = 0; r < valid; ++r) static_cast<float*>(o.y)[i + r] = tmp[r];
      return;
    case DType::BF16:
      _mm_store_si128(reinterpret_cast<__m128i*>(h), pack_dw16(bf16_round_dw(_mm256_castps128_ps256(v))));
      break;
    case DType::F16:
      _mm_store_si128(reinterpret_cast<__m128i*>(h), _mm_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
      break;
  }
  for (int64_t r = 0; r < valid; ++r) static_cast<uint16_t*>(o.y)[i + r] = h[r];
}

}  // namespace avx2
}  // namespace hfquant::cpu
