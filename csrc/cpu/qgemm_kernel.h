// The register-blocked fp32 GEMM of qlinear (the Gemm path for larger M), written once
// over a vector type. Included only by the ISA files (qgemm_avx512.cpp, qgemm_avx2.cpp),
// each with its own compiler flags and a traits struct V:
//   V::vec, V::kW (floats per vector), V::kNR (weight rows per micro-kernel call, a
//   multiple of 2), V::zero(), V::load(const float*), V::set1(float), V::fma(a, b, c) = a*b+c,
//   V::store(float*, vec) (aligned), V::store4(o, m, n0, valid, const float* v4) (the ISA's
//   store4: + bias, cast to the output dtype), V::dequant = the ISA's dequant_tiles_*.
//
// The product is computed transposed, y^T = W x^T, as a BLAS micro-kernel does:
//   - x^T lies in slices of 16 activation rows, xt[c][k][16] (zero for m >= M, k >= K);
//   - each thread dequantizes 3 tiles (12 weight rows) to fp32 into a panel [12][Kp]
//     that stays in L2;
//   - the micro-kernel holds acc[NR][NV] vectors (NV vectors of x rows) for the whole K:
//     per k it loads NV x^T vectors, broadcasts NR weights and issues NR * NV FMAs.
// Each weight is dequantized once per call and used M times; the result is exactly
// sum_k w[n][k] x[m][k] in fp32 with the dequantized w = (v - z) s of the checkpoint.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/qlinear.h"

namespace hfquant::cpu::qgemm {

constexpr int64_t kSlice = 16;  // activation rows per x^T slice
constexpr int64_t kPanelTiles = 3;

// acc[n][j] += panel[n][k] * (x^T rows m0 + j kW ..) at k, for all k < Kp; then the rows
// n < nvalid of the results for activation rows m < M are stored at y[m][n0 + n].
template <class V, int NR, int NV>
void micro(const float* panel, int64_t Kp, const float* xt, int64_t m0, int64_t M, const OutView& o, int64_t n0,
           int64_t nvalid) {
  typename V::vec acc[NR][NV];
  for (int n = 0; n < NR; ++n)
    for (int j = 0; j < NV; ++j) acc[n][j] = V::zero();
  const float* xs[NV];
  for (int j = 0; j < NV; ++j) {
    const int64_t m = m0 + j * V::kW;
    xs[j] = xt + (m / kSlice) * Kp * kSlice + m % kSlice;
  }
  for (int64_t k = 0; k < Kp; ++k) {
    typename V::vec xv[NV];
    for (int j = 0; j < NV; ++j) xv[j] = V::load(xs[j] + k * kSlice);
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
      const typename V::vec w = V::set1(panel[n * Kp + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[n][j] = V::fma(w, xv[j], acc[n][j]);
    }
  }
  // acc[n][j] lane i = y[m0 + j kW + i][n0 + n]: transposed through a small buffer.
  alignas(64) float buf[NR][NV * V::kW];
  for (int n = 0; n < NR; ++n)
    for (int j = 0; j < NV; ++j) V::store(&buf[n][j * V::kW], acc[n][j]);
  const int64_t m1 = std::min(M, m0 + NV * V::kW);
  for (int64_t m = m0; m < m1; ++m) {
    alignas(16) float row[4];
    for (int64_t n = 0; n < nvalid; n += 4) {
      for (int r = 0; r < 4; ++r) row[r] = n + r < NR ? buf[n + r][m - m0] : 0.f;
      V::store4(o, m, n0 + n, std::min<int64_t>(4, nvalid - n), row);
    }
  }
}

// Rows [0, NR) of the panel (weight rows n0 ..) against every activation row.
template <class V, int NR>
void rows_times_x(const float* panel, int64_t Kp, const float* xt, int64_t M, const OutView& o, int64_t n0,
                  int64_t nvalid) {
  int64_t m = 0;
  for (; m + 2 * V::kW <= M; m += 2 * V::kW) micro<V, NR, 2>(panel, Kp, xt, m, M, o, n0, nvalid);
  // the rest: one vector of rows at a time (x^T is zero past M, those lanes are not stored)
  for (; m < M; m += V::kW) micro<V, NR, 1>(panel, Kp, xt, m, M, o, n0, nvalid);
}

// y for tiles [t0, t1): panels of up to 3 tiles, each split into micro-kernel calls of
// V::kNR rows, then 4 and 2 (rows past N are zero in the panel and never stored).
template <class V>
void gemm_tiles(const PackedView& p, const float* xt, int64_t M, const OutView& o, int64_t t0, int64_t t1) {
  thread_local std::vector<float> panel;
  const size_t need = size_t(kPanelTiles * kNR * p.Kp);
  if (panel.size() < need) panel.assign(need, 0.f);
  for (int64_t t = t0; t < t1; t += kPanelTiles) {
    const int64_t nt = std::min(kPanelTiles, t1 - t);
    const int64_t rows = nt * kNR, n0 = t * kNR, nvalid = std::min(rows, p.N - n0);
    // Rows past N (padding of the last tile) are not written by the dequantizer: zero
    // them so the micro-kernel never meets stale values.
    if (nvalid < rows) std::fill(panel.begin() + nvalid * p.Kp, panel.begin() + rows * p.Kp, 0.f);
    V::dequant(p, panel.data(), DType::F32, p.Kp, t, t + nt);
    for (int64_t r = 0; r < rows;) {
      const float* pr = panel.data() + r * p.Kp;
      const int64_t left = nvalid - r;
      if (left <= 0) break;
      if (rows - r >= V::kNR) {
        rows_times_x<V, V::kNR>(pr, p.Kp, xt, M, o, n0 + r, std::min<int64_t>(V::kNR, left));
        r += V::kNR;
      } else if (rows - r >= 4) {
        rows_times_x<V, 4>(pr, p.Kp, xt, M, o, n0 + r, std::min<int64_t>(4, left));
        r += 4;
      } else {
        rows_times_x<V, 2>(pr, p.Kp, xt, M, o, n0 + r, std::min<int64_t>(2, left));
        r += 2;
      }
    }
  }
}

}  // namespace hfquant::cpu::qgemm
