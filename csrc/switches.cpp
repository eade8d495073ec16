// The run-time kernel switches (switches.h): relaxed atomics, since a kernel reads each one
// once per call and needs no ordering with other memory.
#include "switches.h"

#include <atomic>

#include <c10/util/Exception.h>

namespace hfquant::switches {
namespace {
std::atomic<int64_t> g_gemv_max_m{-1};
std::atomic<int64_t> g_gemm_min_m{-1};
std::atomic<int64_t> g_block_rows{-1};
std::atomic<bool> g_qgemm{true};
std::atomic<int64_t> g_cuda_gemm_min_m{65};
std::atomic<int64_t> g_cuda_skinny_max_m{0};
std::atomic<int64_t> g_cuda_skinny_segs{0};
std::atomic<bool> g_cuda_int8_lt{false};
constexpr auto kRelaxed = std::memory_order_relaxed;
}  // namespace

int64_t gemv_max_m() { return g_gemv_max_m.load(kRelaxed); }
void set_gemv_max_m(int64_t m) {
  TORCH_CHECK(m >= -1, "hfquant: gemv_max_m=", m, " is not allowed (-1 for the default, or at least 0)");
  g_gemv_max_m.store(m, kRelaxed);
}

int64_t gemm_min_m() { return g_gemm_min_m.load(kRelaxed); }
void set_gemm_min_m(int64_t m) {
  TORCH_CHECK(m == -1 || m >= 1, "hfquant: gemm_min_m=", m, " is not allowed (-1 for the default, or at least 1)");
  g_gemm_min_m.store(m, kRelaxed);
}

int64_t block_rows() { return g_block_rows.load(kRelaxed); }
void set_block_rows(int64_t rows) {
  TORCH_CHECK(rows == -1 || rows >= 1, "hfquant: block_rows=", rows,
              " is not allowed (-1 for the default, or at least 1)");
  g_block_rows.store(rows, kRelaxed);
}

bool qgemm() { return g_qgemm.load(kRelaxed); }
void set_qgemm(bool on) { g_qgemm.store(on, kRelaxed); }

int64_t cuda_gemm_min_m() { return g_cuda_gemm_min_m.load(kRelaxed); }
void set_cuda_gemm_min_m(int64_t m) {
  TORCH_CHECK(m >= 0, "hfquant: cuda_gemm_min_m=", m, " is not allowed (at least 0)");
  g_cuda_gemm_min_m.store(m, kRelaxed);
}

int64_t cuda_skinny_max_m() { return g_cuda_skinny_max_m.load(kRelaxed); }
void set_cuda_skinny_max_m(int64_t m) {
  TORCH_CHECK(m >= 0 && m <= 64, "hfquant: cuda_skinny_max_m=", m, " is not allowed (0..64; 0 turns it off)");
  g_cuda_skinny_max_m.store(m, kRelaxed);
}

int64_t cuda_skinny_segs() { return g_cuda_skinny_segs.load(kRelaxed); }
void set_cuda_skinny_segs(int64_t segs) {
  TORCH_CHECK(segs >= 0 && segs <= 8, "hfquant: cuda_skinny_segs=", segs,
              " is not allowed (0..8; 0 chooses per layer)");
  g_cuda_skinny_segs.store(segs, kRelaxed);
}

bool cuda_int8_lt() { return g_cuda_int8_lt.load(kRelaxed); }
void set_cuda_int8_lt(bool on) { g_cuda_int8_lt.store(on, kRelaxed); }

}  // namespace hfquant::switches
