// AVX-512 kernels of qlinear (placeholder: forwards to the portable kernel until the
// SIMD version lands).
#include "cpu/qlinear.h"

namespace hfquant::cpu {
void gemv_avx512(const PackedView& p, const ActView& a, float* out, int64_t ldo, int64_t t0, int64_t t1) {
  gemv_portable(p, a, out, ldo, t0, t1);
}
void gemv_avx512bf16(const PackedView& p, const ActView& a, float* out, int64_t ldo, int64_t t0, int64_t t1) {
  gemv_portable(p, a, out, ldo, t0, t1);
}
}  // namespace hfquant::cpu
