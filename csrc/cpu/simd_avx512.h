// Small AVX-512 helpers shared by the kernels compiled with AVX-512 flags. Include only
// from those files (they are entered after a run-time CPU feature check).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/qlinear.h"  // OutView

namespace hfquant::cpu {
inline namespace avx512 {

// fp32 -> bf16 bit patterns, round to nearest even, NaN kept NaN (as c10::BFloat16).
inline __m128i bf16_round(__m128 y) {
  const __m128i u = _mm_castps_si128(y);
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
  __m128i r = _mm_srli_epi32(_mm_add_epi32(u, _mm_add_epi32(lsb, _mm_set1_epi32(0x7FFF))), 16);
  r = _mm_mask_mov_epi32(r, _mm_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm_set1_epi32(0x7FC0));
  return _mm_packus_epi32(r, r);
}

inline __m256i bf16_round(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// y[m][n0 .. n0 + valid) = v (+ bias), converted to the output dtype.
inline void store4(const OutView& o, int64_t m, int64_t n0, int64_t valid, __m128 v) {
  const __mmask8 keep = __mmask8((1u << valid) - 1);
  if (o.bias) v = _mm_add_ps(v, _mm_maskz_loadu_ps(keep, o.bias + n0));
  const int64_t i = m * o.ldy + n0;
  switch (o.dt) {
    case DType::F32: _mm_mask_storeu_ps(static_cast<float*>(o.y) + i, keep, v); break;
    case DType::BF16: _mm_mask_storeu_epi16(static_cast<uint16_t*>(o.y) + i, keep, bf16_round(v)); break;
    case DType::F16:
      _mm_mask_storeu_epi16(static_cast<uint16_t*>(o.y) + i, keep, _mm_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
      break;
  }
}

}  // namespace avx512
}  // namespace hfquant::cpu
