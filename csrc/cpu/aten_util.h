// Small ATen-side helpers shared by the CPU op files (argument handling, dtype dispatch).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <optional>
#include <vector>

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

// Stores y[m][n] (+ bias[n]) converted to the output dtype.
inline void store_out(const OutView& o, int64_t m, int64_t n, float v) {
  if (o.bias) v += o.bias[n];
  const int64_t i = m * o.ldy + n;
  switch (o.dt) {
    case DType::BF16: static_cast<c10::BFloat16*>(o.y)[i] = c10::BFloat16(v); break;
    case DType::F16: static_cast<c10::Half*>(o.y)[i] = c10::Half(v); break;
    default: static_cast<float*>(o.y)[i] = v;
  }
}

// A buffer of `bytes` for one op call's prepared activations: the calling thread's reused
// scratch, or (above 8 MiB) a fresh tensor kept alive by `holder` (qlinear.cpp).
uint8_t* scratch(int64_t bytes, at::Tensor& holder);

// The geometry of a packed pair made by repack (qlinear.cpp checks it).
struct PackedGeometry {
  int64_t gs, G, Kp, T, U;
};

// Checks a packed pair made by repack for a [N, K] weight (the op named in the messages);
// returns the layout's geometry.
PackedGeometry check_packed(const char* op, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                            int64_t bits, int64_t group_size, int64_t N, int64_t K);

// The argument checks of a linear op on that layout (qlinear, qlinear_a8): bits and group size,
// the sizes, x (CPU, float, last dimension K; `device_hint` follows the device message), the
// packed pair and the bias; returns the layout's geometry.
PackedGeometry check_linear_call(const char* op, const at::Tensor& x, const at::Tensor& packed_weight,
                                 const at::Tensor& packed_scales, const std::optional<at::Tensor>& bias, int64_t bits,
                                 int64_t group_size, int64_t N, int64_t K, const char* device_hint);

// A routed-experts call (qlinear_routed, qlinear_routed_a8): the stacked layouts' geometry and
// the rows sorted by expert (stable): sorted position i holds row perm[i]; the rows of expert e
// are perm[start[e] .. start[e + 1]).
struct RoutedCall {
  PackedGeometry geo;  // of each expert
  int64_t E;           // experts
  std::vector<int64_t> start;
  at::Tensor perm;  // int64 [R]
};

// Checks every argument of a routed call (messages name hfquant::<op>; bits is checked by the
// caller) and sorts its rows by expert (qlinear_routed.cpp).
RoutedCall check_routed_call(const char* op, const at::Tensor& x, const at::Tensor& packed_weight,
                             const at::Tensor& packed_scales, const at::Tensor& expert_ids,
                             const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                             int64_t out_features, int64_t in_features);

// Row i of `src` (rows of row_bytes bytes) copied to row dst[i] of `y`, i < R, in parallel: the
// outputs of rows computed in expert order put back in the order of x (qlinear_routed.cpp).
void scatter_rows(uint8_t* y, const uint8_t* src, const int64_t* dst, int64_t R, int64_t row_bytes);

}  // namespace hfquant::cpu
