// Instantiations of the qlinear mma kernels (qlinear_kernel.cuh, qlinear_skinny.cuh) for __nv_bfloat16 activations (one file per dtype so
// that they compile in parallel).
#define HFQUANT_QLINEAR_KERNEL_IMPL
#include "cuda/qlinear_kernel.cuh"
#include "cuda/qlinear_skinny.cuh"

namespace hfquant::cuda {
HFQUANT_INSTANTIATE_QLINEAR(__nv_bfloat16)
HFQUANT_INSTANTIATE_SKINNY(__nv_bfloat16)
}  // namespace hfquant::cuda
