// Portable C++ kernels of qlinear: the path for CPUs without AVX2 and the baseline that
// the SIMD paths are tested against (beside the pure-torch twin in hfquant/ref.py).
#include <algorithm>
#include <cstring>

#include "cpu/qlinear.h"

namespace hfquant::cpu {
namespace {

// Code v of (row r, k) inside tile t.
inline int code_at(const PackedView& p, int64_t t, int64_t r, int64_t k) {
  if (p.bits == 4) {
    const int64_t u = k / 32, j = k % 32;
    const uint8_t byte = p.w[((t * (p.Kp / 32) + u) * kNR + r) * 16 + (j & 15)];
    return j < 16 ? (byte & 0x0F) : (byte >> 4);
  }
  const int64_t u = k / 16, j = k % 16;
  return p.w[((t * (p.Kp / 16) + u) * kNR + r) * 16 + j];
}

}  // namespace

void gemv_portable(const PackedView& p, const ActView& a, float* out, int64_t ldo, int64_t t0,
                   int64_t t1) {
  // The same sum as the SIMD paths: per group, sum of v*x, then scale and zero term.
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t r = 0; r < kNR; ++r) {
      const int64_t n = t * kNR + r;
      if (n >= p.N) break;
      for (int64_t m = 0; m < a.M; ++m) {
        const float* x = a.x + m * p.Kp;
        float acc = 0.f;
        for (int64_t g = 0; g < p.G; ++g) {
          const int64_t k0 = g * p.gs, k1 = std::min(p.Kp, k0 + p.gs);
          float dot = 0.f;
          for (int64_t k = k0; k < k1; ++k) dot += float(code_at(p, t, r, k)) * x[k];
          const float* sb = p.sb + (t * p.G + g) * 2 * kNR;
          // v*x summed directly: the zero term uses s*z, so subtract OFF*s*X back.
          const float s = sb[r];
          const float off = p.bits == 4 ? 128.f : 0.f;
          acc += s * dot - (sb[kNR + r] - off * s) * a.xs[m * p.G + g];
        }
        out[m * ldo + n] = acc;
      }
    }
  }
}

void dequant_tiles_portable(const PackedView& p, float* w_out, int64_t ldw, int64_t t0, int64_t t1) {
  const float off = p.bits == 4 ? 128.f : 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t r = 0; r < kNR; ++r) {
      const int64_t n = t * kNR + r;
      if (n >= p.N) break;
      float* row = w_out + (n - t0 * kNR) * ldw;
      for (int64_t g = 0; g < p.G; ++g) {
        const float* sb = p.sb + (t * p.G + g) * 2 * kNR;
        const float s = sb[r], sz = sb[kNR + r] - off * s;  // s * z
        const int64_t k0 = g * p.gs, k1 = std::min(p.K, k0 + p.gs);
        for (int64_t k = k0; k < k1; ++k) row[k] = float(code_at(p, t, r, k)) * s - sz;
      }
    }
  }
}

}  // namespace hfquant::cpu
