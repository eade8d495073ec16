// Shared helpers of the CUDA op files: argument checks (device agreement, compute
// capability), stream/guard access and small device utilities.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <cstdio>
#include <string>
#include <type_traits>

#include "switches.h"

namespace hfquant::cuda {

// Error messages of the CUDA op files are assembled here (std::to_string, plain string
// appends) and handed to TORCH_CHECK as one string. On the GPU machine these kernels were
// tested on (torch 2.11 + cu130 wheels, extension built with the system compiler), any
// TORCH_CHECK of this extension that formats an integer through std::ostream crashed the
// process instead of raising (CPU op files too); messages built without ostream raise.
namespace msg {
inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}
inline void put(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}
inline void put(std::string& s, at::ScalarType t) { s += c10::toString(t); }
inline void put(std::string& s, const c10::Device& d) { s += d.str(); }
inline void put(std::string& s, c10::IntArrayRef a) {
  s += "[";
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a[i]);
  }
  s += "]";
}
template <typename... A>
std::string cat(const A&... a) {
  std::string s;
  (put(s, a), ...);
  return s;
}
}  // namespace msg

#define HQ_CHECK(cond, ...) TORCH_CHECK(cond, ::hfquant::cuda::msg::cat(__VA_ARGS__))

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Raises unless the device's compute capability is at least 8.0 (the kernels use
// bf16 mma.sync and cuBLASLt int8, sm_80 features).
void check_capability(const char* op, const at::Device& device);

// `t` must be a CUDA tensor on `device` (the device of the op's first tensor).
inline void check_device(const char* op, const char* what, const at::Tensor& t, const at::Device& device) {
  HQ_CHECK(t.is_cuda(), "hfquant::", op, ": ", what, " is on ", t.device(), " but the other arguments are on ",
              device, " (move all tensors of the call to the same CUDA device)");
  HQ_CHECK(t.device() == device, "hfquant::", op, ": ", what, " is on ", t.device(), ", expected ", device,
              " like the other arguments (all tensors of a call must be on one device)");
}

// The device of the first CUDA tensor among the arguments (the dispatcher chose the CUDA
// kernel, so there is one); the others are checked against it.
inline at::Device cuda_device(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t && t->defined() && t->is_cuda()) return t->device();
  return at::Device(at::kCUDA, 0);
}
inline const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

#define HFQUANT_CUDA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()


}  // namespace hfquant::cuda
