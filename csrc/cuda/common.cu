// Compute-capability check (cached per device) and the run-time switches between the
// qlinear kernels (gemm_switch.h).
#include <atomic>
#include <cstdlib>
#include <mutex>

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

namespace {
int64_t env_or(const char* name, int64_t fallback) {
  const char* e = std::getenv(name);
  return e && *e ? int64_t(std::atoll(e)) : fallback;
}
std::atomic<int64_t>& gemm_min_m_ref() {
  static std::atomic<int64_t> v{env_or("HFQUANT_CUDA_GEMM_MIN_M", 65)};
  return v;
}
std::atomic<int64_t>& skinny_max_m_ref() {
  static std::atomic<int64_t> v{env_or("HFQUANT_CUDA_SKINNY_MAX_M", 0)};
  return v;
}
std::atomic<bool>& int8_lt_ref() {
  static std::atomic<bool> v{env_or("HFQUANT_CUDA_INT8_LT", 0) != 0};
  return v;
}
std::atomic<int64_t>& skinny_segs_ref() {
  static std::atomic<int64_t> v{env_or("HFQUANT_CUDA_SKINNY_SEGS", 0)};
  return v;
}
}  // namespace

int64_t gemm_min_m() { return gemm_min_m_ref().load(std::memory_order_relaxed); }
void set_gemm_min_m(int64_t m) { gemm_min_m_ref().store(m, std::memory_order_relaxed); }
int64_t skinny_max_m() { return skinny_max_m_ref().load(std::memory_order_relaxed); }
void set_skinny_max_m(int64_t m) { skinny_max_m_ref().store(m, std::memory_order_relaxed); }
int64_t skinny_segs() { return skinny_segs_ref().load(std::memory_order_relaxed); }
void set_skinny_segs(int64_t s) { skinny_segs_ref().store(s, std::memory_order_relaxed); }
bool int8_lt() { return int8_lt_ref().load(std::memory_order_relaxed); }
void set_int8_lt(bool on) { int8_lt_ref().store(on, std::memory_order_relaxed); }

}  // namespace hfquant::cuda
