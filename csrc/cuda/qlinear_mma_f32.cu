// Instantiations of the qlinear mma kernels (qlinear_kernel.cuh, qlinear_skinny.cuh) for float activations (one file per dtype so
// that they compile in parallel).
#define HFQUANT_QLINEAR_KERNEL_IMPL
#include "cuda/qlinear_kernel.cuh"
#include "cuda/qlinear_skinny.cuh"

namespace hfquant::cuda {
HFQUANT_INSTANTIATE_QLINEAR(float)
HFQUANT_INSTANTIATE_SKINNY(float)
}  // namespace hfquant::cuda
