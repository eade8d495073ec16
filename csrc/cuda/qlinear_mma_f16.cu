// Instantiations of the qlinear mma kernel for __half activations (one file per dtype so
// that they compile in parallel).
#define HFQUANT_QLINEAR_KERNEL_IMPL
#include "cuda/qlinear_kernel.cuh"

namespace hfquant::cuda {
HFQUANT_INSTANTIATE_QLINEAR(__half)
}  // namespace hfquant::cuda
