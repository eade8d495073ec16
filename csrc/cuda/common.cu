// Compute-capability check (cached per device).
#include <atomic>

#include "cuda/common.cuh"

namespace hfquant::cuda {

void check_capability(const char* op, const at::Device& device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0 = unknown, else major * 10 + minor
  const int idx = device.index() < 0 ? 0 : device.index();
  int cc = idx < kMaxDevices ? cache[idx].load(std::memory_order_relaxed) : 0;
  if (cc == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, idx));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, idx));
    cc = major * 10 + minor;
    if (idx < kMaxDevices) cache[idx].store(cc, std::memory_order_relaxed);
  }
  HQ_CHECK(cc >= 80, "hfquant::", op, ": the CUDA kernels need compute capability 8.0 or newer (Ampere, Ada, "
              "Hopper); ", device, " has ", cc / 10, ".", cc % 10, ". Run on the CPU instead (model.to('cpu')).");
}

}  // namespace hfquant::cuda
