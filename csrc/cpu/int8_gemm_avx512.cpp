// int8 GEMM with AVX-512 VNNI: vpdpbusd multiplies 4 unsigned activation bytes (x + 128,
// broadcast) by the 4 signed weight bytes of each of 16 channels and adds the 4 products
// into that channel's int32 lane. The +128 offset adds 128 * colsum[n] to every dot
// product; the epilogue subtracts it, so the int32 results are exact.
//
// Register blocking: MR activation rows x NT tiles of 16 channels, MR * NT <= 24
// accumulators; per step of 4 k, NT weight loads and MR broadcasts feed MR * NT vpdpbusd.
// The loop over rows is inside the loop over tile groups, so a group's weights (NT * K
// bytes) stay in L2 while all rows pass over them.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "cpu/int8_gemm.h"
#include "cpu/simd_avx512.h"

namespace hfquant::cpu::i8 {
namespace {

constexpr int kMaxRows = 8;
constexpr int64_t kPrefetch = 1024;  // bytes ahead in each weight stream

// acc += dot4(a, b) in place. Written as asm: with the intrinsic, GCC 12 copies the
// accumulator through other registers and the stack on every step (measured 2.5x slower).
inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

inline void store16(const Epilogue& e, int64_t m, int64_t n0, __mmask16 keep, __m512i dot, const WeightView& w) {
  if (e.int32_out) {
    _mm512_mask_storeu_epi32(static_cast<int32_t*>(e.y) + m * e.ldy + n0, keep, dot);
    return;
  }
  __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(dot),
                           _mm512_mul_ps(_mm512_set1_ps(e.xs[m]), _mm512_maskz_loadu_ps(keep, e.ws + n0)));
  const int64_t i = m * e.ldy + n0;
  if (e.add) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(keep, e.add + i));
  for (int64_t j = 0; j < e.n_out; ++j)
    f = _mm512_fmadd_ps(_mm512_set1_ps(e.xo[m * e.n_out + j]), _mm512_maskz_loadu_ps(keep, e.wo + j * e.ldy + n0), f);
  if (e.bias) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(keep, e.bias + n0));
  switch (e.dt) {
    case DType::F32: _mm512_mask_storeu_ps(static_cast<float*>(e.y) + i, keep, f); break;
    case DType::BF16: _mm256_mask_storeu_epi16(static_cast<uint16_t*>(e.y) + i, keep, bf16_round(f)); break;
    case DType::F16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(e.y) + i, keep, _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
      break;
  }
}

template <int MR, int NT>
void block(const ActView& a, const WeightView& w, const Epilogue& e, int64_t m, int64_t t) {
  const int64_t K4 = w.K4, ts = K4 * 64;
  const int8_t* w0 = w.w + t * ts;
  const uint8_t* x0 = a.x + m * a.ld;
  __m512i acc[MR][NT];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K4; ++k) {
    __m512i b[NT];
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) {
      const int8_t* p = w0 + j * ts + k * 64;
      if (MR <= 2) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0);
      b[j] = _mm512_loadu_si512(p);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t xv;
      std::memcpy(&xv, x0 + r * a.ld + 4 * k, 4);
      const __m512i av = _mm512_set1_epi32(xv);
#pragma GCC unroll 4
      for (int j = 0; j < NT; ++j) dpbusd(acc[r][j], av, b[j]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NT; ++j) {
    const int64_t n0 = (t + j) * kTile;
    const int64_t valid = std::min<int64_t>(kTile, w.N - n0);
    const __mmask16 keep = __mmask16((1u << valid) - 1);
    const __m512i corr = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(keep, w.colsum + n0), 7);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) store16(e, m + r, n0, keep, _mm512_sub_epi32(acc[r][j], corr), w);
  }
}

using BlockFn = void (*)(const ActView&, const WeightView&, const Epilogue&, int64_t, int64_t);

// Tiles per block for a block of MR rows: at most 24 accumulators, 4 tiles when rows are few.
constexpr int tiles_for(int mr) { return mr <= 4 ? 4 : 3; }

template <int MR>
BlockFn pick_nt(int nt) {
  switch (nt) {
    case 1: return block<MR, 1>;
    case 2: return block<MR, 2>;
    case 3: return block<MR, 3>;
    default: return block<MR, (tiles_for(MR) >= 4 ? 4 : 3)>;
  }
}

BlockFn pick(int mr, int nt) {
  switch (mr) {
    case 1: return pick_nt<1>(nt);
    case 2: return pick_nt<2>(nt);
    case 3: return pick_nt<3>(nt);
    case 4: return pick_nt<4>(nt);
    case 5: return pick_nt<5>(nt);
    case 6: return pick_nt<6>(nt);
    case 7: return pick_nt<7>(nt);
    default: return pick_nt<8>(nt);
  }
}

}  // namespace

void gemm_vnni512(const ActView& a, const WeightView& w, const Epilogue& e, int64_t m0, int64_t m1, int64_t t0,
                  int64_t t1) {
  const int64_t rows = m1 - m0;
  const int full_nt = tiles_for(int(std::min<int64_t>(rows, kMaxRows)));
  for (int64_t t = t0; t < t1; t += full_nt) {
    const int nt = int(std::min<int64_t>(full_nt, t1 - t));
    for (int64_t m = m0; m < m1; m += kMaxRows) {
      const int mr = int(std::min<int64_t>(kMaxRows, m1 - m));
      pick(mr, std::min(nt, tiles_for(mr)))(a, w, e, m, t);
    }
  }
}

namespace {

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// Columns flagged in mask (bytes != 0) as a 16-bit mask.
inline __mmask16 flagged(const uint8_t* mask, int64_t k, __mmask16 keep) {
  return _mm_mask_test_epi8_mask(keep, _mm_maskz_loadu_epi8(keep, mask + k), _mm_set1_epi8(-1));
}

void flag_avx512(const float* v, int64_t K, float threshold, uint8_t* mask) {
  const __m512 t = _mm512_set1_ps(threshold);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 keep = tail_mask(K - k);
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(keep, v + k));
    const __mmask16 out = _mm512_mask_cmp_ps_mask(keep, a, t, _CMP_NLT_UQ);  // !(a < t)
    const __m128i old = _mm_maskz_loadu_epi8(keep, mask + k);
    _mm_mask_storeu_epi8(mask + k, keep, _mm_or_si128(old, _mm_maskz_set1_epi8(out, 1)));
  }
}

float absmax_avx512(const float* v, int64_t K, const uint8_t* mask) {
  __m512 amax = _mm512_setzero_ps();
  const __m512 big = _mm512_set1_ps(std::numeric_limits<float>::max());
  __mmask16 bad = 0;
  for (int64_t k = 0; k < K; k += 16) {
    __mmask16 keep = tail_mask(K - k);
    if (mask) keep &= ~flagged(mask, k, keep);
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(keep, v + k));
    bad |= _mm512_mask_cmp_ps_mask(keep, a, big, _CMP_NLE_UQ);  // NaN or Inf
    amax = _mm512_max_ps(amax, a);
  }
  return bad ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(amax);
}

void quant_avx512(const float* v, int64_t K, const uint8_t* mask, float inv, uint8_t* q, uint8_t offset) {
  const __m512 s = _mm512_set1_ps(inv);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const __m128i off = _mm_set1_epi8(char(offset));
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 keep = tail_mask(K - k);
    __mmask16 use = keep;
    if (mask) use &= ~flagged(mask, k, keep);
    // cvtps rounds to nearest even (the default MXCSR mode), as round() in the reference
    __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(use, v + k), s));
    r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
    _mm_mask_storeu_epi8(q + k, keep, _mm_add_epi8(_mm512_cvtepi32_epi8(r), off));
  }
}

}  // namespace

const RowFns kRowsAvx512{flag_avx512, absmax_avx512, quant_avx512};

}  // namespace hfquant::cpu::i8
