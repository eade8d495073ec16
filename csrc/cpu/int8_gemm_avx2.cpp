// int8 GEMM with AVX2: vpmaddubsw multiplies unsigned by signed bytes and adds pairs into
// int16 with saturation. With the sign trick (|w| unsigned, x * sign(w) signed) every pair
// sum is at most 2 * 128 * 127 = 32512 < 32767, so nothing saturates and the results are
// exact without a column-sum correction; the unsigned-offset trick (x + 128) would overflow
// int16 (2 * 255 * 127) unless activations were cut to 7 bits. vpmaddwd with ones then
// widens the pairs into the int32 lane of each channel. Activations must lie in
// [-127, 127] (x = -128 has no positive counterpart for the sign flip); the op checks it.
//
// A tile of 16 channels x 4 k is two 256-bit halves of 8 channels; blocks of up to 4 rows.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/int8_gemm.h"
#include "cpu/simd_avx2.h"

namespace hfquant::cpu::i8 {
namespace {

constexpr int kMaxRows = 4;

inline void store8(const Epilogue& e, int64_t m, int64_t n0, int64_t valid, __m256i dot) {
  alignas(32) int32_t ibuf[8];
  alignas(32) float fbuf[8];
  alignas(16) uint16_t hbuf[8];
  if (e.int32_out) {
    int32_t* dst = static_cast<int32_t*>(e.y) + m * e.ldy + n0;
    if (valid == 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), dot);
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(ibuf), dot);
      std::memcpy(dst, ibuf, valid * 4);
    }
    return;
  }
  __m256 ws, bias = _mm256_setzero_ps();
  if (valid == 8) {
    ws = _mm256_loadu_ps(e.ws + n0);
    if (e.bias) bias = _mm256_loadu_ps(e.bias + n0);
  } else {
    std::fill(fbuf, fbuf + 8, 0.f);
    std::memcpy(fbuf, e.ws + n0, valid * 4);
    ws = _mm256_load_ps(fbuf);
    if (e.bias) {
      std::memcpy(fbuf, e.bias + n0, valid * 4);
      bias = _mm256_load_ps(fbuf);
    }
  }
  __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(_mm256_set1_ps(e.xs[m]), ws));
  if (e.bias) f = _mm256_add_ps(f, bias);
  const int64_t i = m * e.ldy + n0;
  switch (e.dt) {
    case DType::F32:
      if (valid == 8) {
        _mm256_storeu_ps(static_cast<float*>(e.y) + i, f);
      } else {
        _mm256_store_ps(fbuf, f);
        std::memcpy(static_cast<float*>(e.y) + i, fbuf, valid * 4);
      }
      return;
    case DType::BF16: _mm_store_si128(reinterpret_cast<__m128i*>(hbuf), pack_dw16(bf16_round_dw(f))); break;
    case DType::F16:
      _mm_store_si128(reinterpret_cast<__m128i*>(hbuf), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
      break;
  }
  std::memcpy(static_cast<uint16_t*>(e.y) + i, hbuf, valid * 2);
}

template <int MR>
void block(const ActView& a, const WeightView& w, const Epilogue& e, int64_t m, int64_t t) {
  const int64_t K4 = w.K4;
  const int8_t* w0 = w.w + t * K4 * 64;
  const uint8_t* x0 = a.x + m * a.ld;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K4; ++k) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + k * 64));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + k * 64 + 32));
    const __m256i u0 = _mm256_sign_epi8(b0, b0), u1 = _mm256_sign_epi8(b1, b1);  // |w|
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      int32_t xv;
      std::memcpy(&xv, x0 + r * a.ld + 4 * k, 4);
      const __m256i xb = _mm256_set1_epi32(xv);
      const __m256i p0 = _mm256_maddubs_epi16(u0, _mm256_sign_epi8(xb, b0));
      const __m256i p1 = _mm256_maddubs_epi16(u1, _mm256_sign_epi8(xb, b1));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones));
    }
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = t * kTile + 8 * h;
    const int64_t valid = std::min<int64_t>(8, w.N - n0);
    if (valid <= 0) break;
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) store8(e, m + r, n0, valid, acc[r][h]);
  }
}

}  // namespace

void gemm_avx2(const ActView& a, const WeightView& w, const Epilogue& e, int64_t m0, int64_t m1, int64_t t0,
               int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t m = m0; m < m1; m += kMaxRows) {
      switch (std::min<int64_t>(kMaxRows, m1 - m)) {
        case 1: block<1>(a, w, e, m, t); break;
        case 2: block<2>(a, w, e, m, t); break;
        case 3: block<3>(a, w, e, m, t); break;
        default: block<4>(a, w, e, m, t); break;
      }
    }
  }
}

}  // namespace hfquant::cpu::i8
