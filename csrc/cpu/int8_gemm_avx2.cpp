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
#include <cmath>
#include <cstring>
#include <limits>

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
  const int64_t i = m * e.ldy + n0;
  // the first `valid` floats at p, zero padded
  auto load = [&](const float* p) {
    if (valid == 8) return _mm256_loadu_ps(p);
    std::fill(fbuf, fbuf + 8, 0.f);
    std::memcpy(fbuf, p, valid * 4);
    return _mm256_load_ps(fbuf);
  };
  __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(_mm256_set1_ps(e.xs[m]), load(e.ws + n0)));
  if (e.add) f = _mm256_add_ps(f, load(e.add + i));
  for (int64_t j = 0; j < e.n_out; ++j)
    f = _mm256_fmadd_ps(_mm256_set1_ps(e.xo[m * e.n_out + j]), load(e.wo + j * e.ldy + n0), f);
  if (e.bias) f = _mm256_add_ps(f, load(e.bias + n0));
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

// AVX-VNNI (VEX vpdpbusd on 256 bits, e.g. Alder Lake and later, Zen 5): unsigned
// activation bytes (x + 128) times signed weights, exact, with the 128 * colsum correction
// of the VNNI path; a tile is two 8-channel halves, blocks of up to 6 rows (12 accumulators).
template <int MR>
__attribute__((target("avx2,fma,f16c,avxvnni"))) void block_vnni(const ActView& a, const WeightView& w,
                                                                 const Epilogue& e, int64_t m, int64_t t) {
  const int64_t K4 = w.K4;
  const int8_t* w0 = w.w + t * K4 * 64;
  const uint8_t* x0 = a.x + m * a.ld;
  __m256i acc[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K4; ++k) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + k * 64));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + k * 64 + 32));
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      int32_t xv;
      std::memcpy(&xv, x0 + r * a.ld + 4 * k, 4);
      const __m256i xb = _mm256_set1_epi32(xv);
      acc[r][0] = _mm256_dpbusd_avx_epi32(acc[r][0], xb, b0);
      acc[r][1] = _mm256_dpbusd_avx_epi32(acc[r][1], xb, b1);
    }
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = t * kTile + 8 * h;
    const int64_t valid = std::min<int64_t>(8, w.N - n0);
    if (valid <= 0) break;
    alignas(32) int32_t cs[8] = {};
    std::memcpy(cs, w.colsum + n0, valid * 4);
    const __m256i corr = _mm256_slli_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(cs)), 7);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) store8(e, m + r, n0, valid, _mm256_sub_epi32(acc[r][h], corr));
  }
}

}  // namespace

void gemm_avxvnni(const ActView& a, const WeightView& w, const Epilogue& e, int64_t m0, int64_t m1, int64_t t0,
                  int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t m = m0; m < m1; m += 6) {
      switch (std::min<int64_t>(6, m1 - m)) {
        case 1: block_vnni<1>(a, w, e, m, t); break;
        case 2: block_vnni<2>(a, w, e, m, t); break;
        case 3: block_vnni<3>(a, w, e, m, t); break;
        case 4: block_vnni<4>(a, w, e, m, t); break;
        case 5: block_vnni<5>(a, w, e, m, t); break;
        default: block_vnni<6>(a, w, e, m, t); break;
      }
    }
  }
}

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

namespace {

inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }

// mask bytes k..k+7 -> all-ones lanes where set
inline __m256 flagged8(const uint8_t* mask, int64_t k) {
  int64_t m8;
  std::memcpy(&m8, mask + k, 8);
  const __m256i f = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(m8));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(f, _mm256_setzero_si256()));
}

void flag_avx2(const float* v, int64_t K, float threshold, uint8_t* mask) {
  const __m256 t = _mm256_set1_ps(threshold);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const int bits = _mm256_movemask_ps(_mm256_cmp_ps(abs8(_mm256_loadu_ps(v + k)), t, _CMP_NLT_UQ));
    for (int i = 0; i < 8; ++i) mask[k + i] |= uint8_t((bits >> i) & 1);
  }
  for (; k < K; ++k) mask[k] |= uint8_t(!(std::fabs(v[k]) < threshold));
}

float absmax_avx2(const float* v, int64_t K, const uint8_t* mask) {
  __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  const __m256 big = _mm256_set1_ps(std::numeric_limits<float>::max());
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 a = abs8(_mm256_loadu_ps(v + k));
    if (mask) a = _mm256_andnot_ps(flagged8(mask, k), a);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));
    amax = _mm256_max_ps(amax, a);
  }
  alignas(32) float m[8];
  _mm256_store_ps(m, amax);
  float r = *std::max_element(m, m + 8);
  bool nonfinite = _mm256_movemask_ps(bad) != 0;
  for (; k < K; ++k) {
    if (mask && mask[k]) continue;
    const float a = std::fabs(v[k]);
    nonfinite |= !(a <= std::numeric_limits<float>::max());
    r = std::max(r, a);
  }
  return nonfinite ? std::numeric_limits<float>::quiet_NaN() : r;
}

void quant_avx2(const float* v, int64_t K, const uint8_t* mask, float inv, uint8_t* q, uint8_t offset) {
  const __m256 s = _mm256_set1_ps(inv);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  const __m256i off = _mm256_set1_epi32(offset);
  // bytes 0, 4, 8, .. of each 128-bit lane -> the low 4 bytes of that lane
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(v + k), s);
    if (mask) x = _mm256_andnot_ps(flagged8(mask, k), x);
    __m256i r = _mm256_cvtps_epi32(x);  // round to nearest even
    r = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(r, lo), hi), off);
    const __m256i b = _mm256_shuffle_epi8(r, pick);
    const uint32_t w0 = uint32_t(_mm256_extract_epi32(b, 0)), w1 = uint32_t(_mm256_extract_epi32(b, 4));
    std::memcpy(q + k, &w0, 4);
    std::memcpy(q + k + 4, &w1, 4);
  }
  for (; k < K; ++k) {
    const float r = (mask && mask[k]) ? 0.f : std::min(127.f, std::max(-127.f, std::nearbyint(v[k] * inv)));
    q[k] = uint8_t(int8_t(int(r))) + offset;
  }
}

}  // namespace

const RowFns kRowsAvx2{flag_avx2, absmax_avx2, quant_avx2};

}  // namespace hfquant::cpu::i8
