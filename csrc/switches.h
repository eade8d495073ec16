// The run-time kernel switches: one atomic each, in switches.cpp. hfquant.settings
// (hfquant/runtime.py) sets them through _C's setters (bindings.cpp); the kernels read them
// each time they choose a path. Setters check their argument. The CPU kernel path and the
// int8 GEMM path live beside the feature checks they need (cpu_features.h, int8_gemm.h).
// Plain C++ (no CUDA headers): the CUDA switches exist in every build and act only where
// the CUDA kernels are built.
#pragma once
#include <cstdint>

namespace hfquant::switches {

// CPU qlinear and lut_linear: largest M served by the GEMV kernels; -1 (default): chosen per
// kernel path, layer size and dtype (qlinear.cpp, lut_linear.cpp). At least -1.
int64_t gemv_max_m();
void set_gemv_max_m(int64_t m);
// CPU qlinear: smallest M of the register-blocked Gemm path; -1 (default): chosen per kernel
// path and bits (qlinear.cpp). -1 or at least 1.
int64_t gemm_min_m();
void set_gemm_min_m(int64_t m);
// CPU qlinear: weight rows dequantized per GEMM call on the blocked path (rounded down to whole
// 4-row tiles, at least one); -1 (default): a buffer of about 16 MiB. -1 or at least 1.
int64_t block_rows();
void set_block_rows(int64_t rows);
// CPU qlinear: whether the register-blocked Gemm path may serve large M (default true); off,
// those calls take the blocked path (dequantize + ATen's GEMM).
bool qgemm();
void set_qgemm(bool on);

// CUDA qlinear: smallest M at which bf16/fp16 x takes dequantize + cuBLAS (default 65: measured
// on an H100, the mma kernel wins up to M = 64). At least 0.
int64_t cuda_gemm_min_m();
void set_cuda_gemm_min_m(int64_t m);
// CUDA qlinear: largest M that takes the skinny split-K kernel (qlinear_skinny.cuh); 0 (default,
// until measured on a GPU): off. 0..64.
int64_t cuda_skinny_max_m();
void set_cuda_skinny_max_m(int64_t m);
// CUDA qlinear: segments per block of the skinny kernel; 0 (default): chosen from the layer and
// the GPU's size, 1..8 forces (tests, benchmark sweeps).
int64_t cuda_skinny_segs();
void set_cuda_skinny_segs(int64_t segs);
// CUDA int8 GEMM: cuBLASLt with its heuristic algorithm and a workspace (true), or at::_int_mm
// (false, the default until the first is measured on a GPU).
bool cuda_int8_lt();
void set_cuda_int8_lt(bool on);

}  // namespace hfquant::switches
