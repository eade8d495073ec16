// int8 GEMM in portable C++ (int8 activations, int32 accumulation): the path of CPUs
// without AVX2, and the simplest statement of the kernel contract in int8_gemm.h.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/int8_gemm.h"

namespace hfquant::cpu::i8 {

void gemm_portable(const ActView& a, const WeightView& w, const Epilogue& e, int64_t m0, int64_t m1, int64_t t0,
                   int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const int8_t* wt = w.w + t * w.K4 * 64;
    const int64_t nv = std::min<int64_t>(kTile, w.N - t * kTile);
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* x = reinterpret_cast<const int8_t*>(a.x + m * a.ld);
      int32_t acc[kTile] = {};
      for (int64_t k = 0; k < w.K4; ++k)
        for (int64_t c = 0; c < kTile; ++c)
          for (int64_t b = 0; b < kKG; ++b) acc[c] += int32_t(x[4 * k + b]) * int32_t(wt[(k * kTile + c) * kKG + b]);
      for (int64_t c = 0; c < nv; ++c) {
        const int64_t n = t * kTile + c, i = m * e.ldy + n;
        if (e.int32_out) {
          static_cast<int32_t*>(e.y)[i] = acc[c];
          continue;
        }
        float f = float(acc[c]) * (e.xs[m] * e.ws[n]);
        if (e.add) f += e.add[i];
        for (int64_t j = 0; j < e.n_out; ++j) f += e.xo[m * e.n_out + j] * e.wo[j * e.ldy + n];
        if (e.bias) f += e.bias[n];
        switch (e.dt) {
          case DType::F32: static_cast<float*>(e.y)[i] = f; break;
          case DType::BF16: static_cast<c10::BFloat16*>(e.y)[i] = c10::BFloat16(f); break;
          case DType::F16: static_cast<c10::Half*>(e.y)[i] = c10::Half(f); break;
        }
      }
    }
  }
}

namespace {

void flag_portable(const float* v, int64_t K, float threshold, uint8_t* mask) {
  for (int64_t k = 0; k < K; ++k) mask[k] |= uint8_t(!(std::fabs(v[k]) < threshold));
}

float absmax_portable(const float* v, int64_t K, const uint8_t* mask) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    if (mask && mask[k]) continue;
    const float a = std::fabs(v[k]);
    if (!(a <= std::numeric_limits<float>::max())) return std::numeric_limits<float>::quiet_NaN();
    amax = std::max(amax, a);
  }
  return amax;
}

void quant_portable(const float* v, int64_t K, const uint8_t* mask, float inv, uint8_t* q, uint8_t offset) {
  for (int64_t k = 0; k < K; ++k) {
    const float r = (mask && mask[k]) ? 0.f : std::min(127.f, std::max(-127.f, std::nearbyint(v[k] * inv)));
    q[k] = uint8_t(int8_t(int(r))) + offset;
  }
}

}  // namespace

const RowFns kRowsPortable{flag_portable, absmax_portable, quant_portable};

}  // namespace hfquant::cpu::i8
