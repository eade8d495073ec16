// AVX-512 register-blocked GEMM of qlinear for fp32 arithmetic at larger M (the prefill
// path for fp32 and fp16 activations).
//
// The GEMV kernels (qlinear_avx512.cpp) keep 4 rows of weights in the lanes of one zmm
// and broadcast x into it: one x load per FMA, which caps them near half of the FMA
// throughput once M is large. Here the product is computed transposed, y^T = W x^T, as a
// BLAS micro-kernel does:
//   - x^T is laid out once per call, straight from x (fp32, bf16 or fp16), in slices of
//     16 activation rows: xt[c][k][16] (zero for rows >= M and k >= K), by 16x16
//     register transposes;
//   - each thread dequantizes NR = 4 * NT weight rows (NT tiles) to fp32 into a panel
//     [NR][Kp] that stays in L2 (the dequantizer of the blocked path, qlinear.h);
//   - the micro-kernel holds acc[NR][MZ] zmm (MZ slices of 16 rows of x) for the whole
//     K: per k it loads MZ x^T vectors, broadcasts NR weights and issues NR * MZ FMAs
//     (NT = 3, MZ = 2: 24 accumulators, 26 FMAs+broadcasts per 2 loads).
// Each weight is dequantized once per call and used M times; the results are exactly
// sum_k w[n][k] x[m][k] in fp32 with the dequantized w = (v - z) s of the checkpoint.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/qlinear.h"
#include "cpu/simd_avx512.h"

namespace hfquant::cpu {
namespace {

constexpr int64_t kSlice = 16;  // activation rows per x^T slice

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

// y[m][n0 + i] for i < valid (<= 4) from v, + bias, converted to the output dtype.
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

// acc[n][z] += panel[n][k] * xt slices (c0 + z) at k, for all k < Kp; then the results of
// rows n < nvalid and activation rows m < M are stored at y[m][n0 + n].
template <int NR, int MZ>
void micro(const float* panel, int64_t Kp, const float* xt, int64_t c0, int64_t M, const OutView& o, int64_t n0,
           int64_t nvalid) {
  __m512 acc[NR][MZ];
  for (int n = 0; n < NR; ++n)
    for (int z = 0; z < MZ; ++z) acc[n][z] = _mm512_setzero_ps();
  const float* xs[MZ];
  for (int z = 0; z < MZ; ++z) xs[z] = xt + (c0 + z) * Kp * kSlice;
  for (int64_t k = 0; k < Kp; ++k) {
    __m512 xv[MZ];
    for (int z = 0; z < MZ; ++z) xv[z] = _mm512_loadu_ps(xs[z] + k * kSlice);
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
      const __m512 w = _mm512_set1_ps(panel[n * Kp + k]);
#pragma GCC unroll 4
      for (int z = 0; z < MZ; ++z) acc[n][z] = _mm512_fmadd_ps(w, xv[z], acc[n][z]);
    }
  }
  // acc[n][z] lane j = y[16 (c0 + z) + j][n0 + n]: transpose through a small buffer.
  alignas(64) float buf[NR][MZ * kSlice];
  for (int n = 0; n < NR; ++n)
    for (int z = 0; z < MZ; ++z) _mm512_store_ps(&buf[n][z * kSlice], acc[n][z]);
  const int64_t m0 = c0 * kSlice, m1 = std::min(M, m0 + MZ * kSlice);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t j = m - m0;
    for (int64_t n = 0; n < nvalid; n += 4)
      store4(o, m, n0 + n, std::min<int64_t>(4, nvalid - n),
             _mm_setr_ps(buf[n][j], buf[std::min<int64_t>(n + 1, NR - 1)][j],
                         buf[std::min<int64_t>(n + 2, NR - 1)][j], buf[std::min<int64_t>(n + 3, NR - 1)][j]));
  }
}

template <int NR>
void panel_times_x(const float* panel, int64_t Kp, const float* xt, int64_t M, const OutView& o, int64_t n0,
                   int64_t nvalid) {
  const int64_t C = (M + kSlice - 1) / kSlice;
  int64_t c = 0;
  for (; c + 2 <= C; c += 2) micro<NR, 2>(panel, Kp, xt, c, M, o, n0, nvalid);
  if (c < C) micro<NR, 1>(panel, Kp, xt, c, M, o, n0, nvalid);
}

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

// Tiles [t0, t1) of y = x W^T: 3 tiles (12 rows) per panel, fewer at the end of the range.
void gemm_avx512(const PackedView& p, const float* xt, int64_t M, const OutView& o, int64_t t0, int64_t t1) {
  constexpr int64_t kNT = 3;
  thread_local std::vector<float> panel;
  const size_t need = size_t(kNT * kNR * p.Kp);
  if (panel.size() < need) panel.assign(need, 0.f);
  for (int64_t t = t0; t < t1; t += kNT) {
    const int64_t nt = std::min(kNT, t1 - t);
    const int64_t n0 = t * kNR, nvalid = std::min(nt * kNR, p.N - n0);
    // Rows past N (padding of the last tile) are not written by the dequantizer: zero
    // them so the micro-kernel never meets stale values (their results are not stored).
    if (nvalid < nt * kNR) std::fill(panel.begin() + nvalid * p.Kp, panel.begin() + nt * kNR * p.Kp, 0.f);
    dequant_tiles_avx512(p, panel.data(), DType::F32, p.Kp, t, t + nt);
    switch (nt) {
      case 3: panel_times_x<12>(panel.data(), p.Kp, xt, M, o, n0, nvalid); break;
      case 2: panel_times_x<8>(panel.data(), p.Kp, xt, M, o, n0, nvalid); break;
      default: panel_times_x<4>(panel.data(), p.Kp, xt, M, o, n0, nvalid); break;
    }
  }
}

}  // namespace hfquant::cpu
