// The fast Walsh-Hadamard transform's row kernel, for ops that transform rows they produce
// (the rotated KV-cache dequantizer); csrc/cpu/hadamard.cpp.
#pragma once
#include <cstdint>

namespace hfquant::cpu {

// In place: v[0..p) <- (H v) * scale, H the Sylvester Hadamard matrix of order p (a power of
// two), with the butterflies in the order of hfquant.transforms.fwht.
using FwhtRowFn = void (*)(float* v, int64_t p, float scale);

// The active kernel path's row kernel (any p).
FwhtRowFn fwht_row_kernel();

}  // namespace hfquant::cpu
