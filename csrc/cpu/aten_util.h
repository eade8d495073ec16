// Small ATen-side helpers shared by the CPU op files (argument handling, dtype dispatch).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/qlinear.h"  // DType

namespace hfquant::cpu {

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

inline bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// The kernels' element type for a float dtype (float32 for anything else).
inline DType dtype_of(at::ScalarType t) {
  return t == at::kBFloat16 ? DType::BF16 : t == at::kHalf ? DType::F16 : DType::F32;
}

// Calls f with a null pointer of the C++ type of a float dtype (float, c10::BFloat16,
// c10::Half); any other dtype raises, naming the op and the tensor.
template <typename F>
void dispatch_float(at::ScalarType t, const char* op, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    case at::kHalf: f(static_cast<c10::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, "hfquant::", op, ": ", what, " must be float32, bfloat16 or float16, got ", t);
  }
}

}  // namespace hfquant::cpu
