// Portable C++ kernels of lut_linear: the reference walk of the layout in lut_linear.h,
// for CPUs without AVX2 (and the path the SIMD kernels are checked against in tests).
#include <algorithm>

#include "cpu/lut_linear.h"

namespace hfquant::cpu {

namespace {
// Index of k in row `w` (one row of the kernel layout).
inline int index_at(const uint8_t* w, int64_t k) {
  const uint8_t b = w[(k / kLutUnitK) * 16 + (k & 15)];
  return (k & 16) ? (b >> 4) : (b & 0x0F);
}
}  // namespace

void lut_gemv_portable(const LutView& p, const float* x, int64_t M, float* y, int64_t ldy, const float* bias,
                       int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = p.idx + n * (p.Kp / 2);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * p.Kp;
      float acc = 0.f;
      for (int64_t g = 0; g < p.G; ++g) {
        const float* tab = p.tab + (n * p.G + g) * kLutTable;
        const int64_t k1 = std::min(p.K, (g + 1) * p.gs);
        // padded k (>= K) multiply x = 0 and are skipped
        for (int64_t k = g * p.gs; k < k1; ++k) acc += tab[index_at(w, k)] * xm[k];
      }
      y[m * ldy + n] = bias ? acc + bias[n] : acc;
    }
  }
}

void lut_dequant_portable(const LutView& p, float* w, int64_t ldw, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.idx + n * (p.Kp / 2);
    float* out = w + (n - n0) * ldw;
    for (int64_t k = 0; k < p.Kp; ++k) {
      const int64_t g = std::min(k / p.gs, p.G - 1);
      out[k] = p.tab[(n * p.G + g) * kLutTable + index_at(row, k)];
    }
  }
}

}  // namespace hfquant::cpu
