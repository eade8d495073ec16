// The run-time switch of CUDA qlinear between the mma.sync kernel and dequantize + cuBLAS,
// visible to the plain C++ part of the extension (bindings.cpp) without CUDA headers.
#pragma once
#include <cstdint>

namespace hfquant::cuda {
// Smallest M at which bf16/fp16 activations take dequantize + cuBLAS (default 65: measured on an H100, the mma kernel wins up to M = 64,
// HFQUANT_CUDA_GEMM_MIN_M overrides).
int64_t gemm_min_m();
void set_gemm_min_m(int64_t m);
}  // namespace hfquant::cuda
