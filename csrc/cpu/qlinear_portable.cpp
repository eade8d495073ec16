// Portable C++ kernels of qlinear: the path for CPUs without AVX2 and the baseline that
// the SIMD paths are tested against (beside the pure-torch twin in hfquant/ref.py).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>

#include "cpu/aten_util.h"
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

inline float load_x(const void* x, DType xt, int64_t i) {
  switch (xt) {
    case DType::BF16: return float(static_cast<const c10::BFloat16*>(x)[i]);
    case DType::F16: return float(static_cast<const c10::Half*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

}  // namespace

void gemv_portable(const PackedView& p, const ActView& a, const OutView& o, int64_t t0, int64_t t1) {
  // The same sum as the SIMD paths: per group, sum of v*x, then scale and zero term.
  const float off = p.bits == 4 ? 128.f : 0.f;
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
          acc += s * dot - (sb[kNR + r] - off * s) * a.xs[m * p.G + g];
        }
        store_out(o, m, n, acc);
      }
    }
  }
}

void prepare_portable(const void* x, DType xt, int64_t ldx, int64_t M, const PackedView& p, bool split,
                      float* xo, float* xs, uint16_t* xhi, uint16_t* xlo) {
  for (int64_t m = 0; m < M; ++m) {
    float* row = xo + m * p.Kp;
    for (int64_t k = 0; k < p.K; ++k) row[k] = load_x(x, xt, m * ldx + k);
    std::fill(row + p.K, row + p.Kp, 0.f);
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t k0 = g * p.gs, k1 = std::min(p.Kp, k0 + p.gs);
      float sum = 0.f;
      for (int64_t k = k0; k < k1; ++k) {
        if (split) {
          // x = hi + lo in bf16: each product with a 4-bit code is then exact in fp32, and
          // the group sum uses hi + lo so the zero term cancels what the dot products saw.
          const c10::BFloat16 hi(row[k]);
          const c10::BFloat16 lo(xt == DType::BF16 ? 0.f : row[k] - float(hi));
          xhi[m * p.Kp + k] = hi.x;
          xlo[m * p.Kp + k] = lo.x;
          sum += float(hi) + float(lo);
        } else {
          sum += row[k];
        }
      }
      xs[m * p.G + g] = sum;
    }
  }
}

void dequant_tiles_portable(const PackedView& p, void* w_out, DType wt, int64_t ldw, int64_t t0, int64_t t1) {
  for_each_row_group(p, ldw, t0, t1, [&](int64_t row, int64_t t, int64_t r, int64_t g, float s, float sz) {
    const int64_t k0 = g * p.gs, k1 = std::min(p.K, k0 + p.gs);
    for (int64_t k = k0; k < k1; ++k) {
      const float w = float(code_at(p, t, r, k)) * s - sz;
      if (wt == DType::BF16)
        static_cast<c10::BFloat16*>(w_out)[row + k] = c10::BFloat16(w);
      else
        static_cast<float*>(w_out)[row + k] = w;
    }
  });
}

}  // namespace hfquant::cpu
