// The run-time switches of CUDA qlinear between its kernels (the skinny split-K kernel for
// small M, the mma.sync kernel, dequantize + cuBLAS),
// visible to the plain C++ part of the extension (bindings.cpp) without CUDA headers.
#pragma once
#include <cstdint>

namespace hfquant::cuda {
// Smallest M at which bf16/fp16 activations take dequantize + cuBLAS (default 65: measured on an H100, the mma kernel wins up to M = 64,
// HFQUANT_CUDA_GEMM_MIN_M overrides).
int64_t gemm_min_m();
void set_gemm_min_m(int64_t m);
// Largest M that takes the skinny split-K kernel (qlinear_skinny.cuh; at most 64). Default 0
// (off) until it is measured on a GPU; HFQUANT_CUDA_SKINNY_MAX_M overrides.
int64_t skinny_max_m();
void set_skinny_max_m(int64_t m);
// Segments per block of the skinny kernel: 0 chooses from the layer and the GPU's size,
// 1..8 forces (tests, benchmark sweeps); HFQUANT_CUDA_SKINNY_SEGS overrides.
int64_t skinny_segs();
void set_skinny_segs(int64_t s);
// Whether the int8 GEMM calls cuBLASLt with its heuristic algorithm and a workspace, or
// at::_int_mm (default until the first is measured on a GPU; HFQUANT_CUDA_INT8_LT=1 turns it on).
bool int8_lt();
void set_int8_lt(bool on);
}  // namespace hfquant::cuda
