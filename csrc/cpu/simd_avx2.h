// Small AVX2 helpers shared by the kernels compiled with AVX2 flags. Include only from
// those files (they are entered after a run-time CPU feature check).
#pragma once
#include <immintrin.h>

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

}  // namespace avx2
}  // namespace hfquant::cpu
