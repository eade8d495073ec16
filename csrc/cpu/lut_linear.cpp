// hfquant::lut_repack and hfquant::lut_linear on CPU (weight clustering, method "kmeans"):
// argument checks, the layout conversion, activation preparation and the choice between
// the GEMV kernels (small M: one pass over the packed indices, codebook lookups in
// registers) and the blocked path for large M (decode a block of rows to fp32 into a
// small buffer, then ATen's GEMM on it). Layout and kernels: lut_linear.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/aten_util.h"
#include "cpu/cpu_features.h"
#include "cpu/lut_linear.h"
#include "switches.h"

namespace hfquant::cpu {
namespace {

void check_lut_args(const char* op, int64_t bits, int64_t group_size, int64_t N, int64_t K) {
  TORCH_CHECK(bits >= 2 && bits <= 4, "hfquant::", op, ": bits=", bits, " is not supported (use 2, 3 or 4)");
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % kLutUnitK == 0), "hfquant::", op,
              ": group_size=", group_size, " must be -1 (one codebook per row) or a positive multiple of 32");
  TORCH_CHECK(N > 0 && K > 0, "hfquant::", op, ": out_features=", N, " and in_features=", K, " must be positive");
}

// (group length in k, groups per row); one codebook per row = one group of Kp.
void lut_groups(int64_t group_size, int64_t K, int64_t& gs, int64_t& G) {
  if (group_size == -1) {
    gs = round_up(K, kLutUnitK);
    G = 1;
  } else {
    gs = group_size;
    G = (K + group_size - 1) / group_size;
  }
}

// Largest M served by the GEMV kernels (the gemv_max_m switch overrides, as for qlinear).
// The AVX-512 kernel decodes a 4-row block once per 4 activation rows, so its cost per m
// is close to the FMA work. Measured (1 thread, Zen 5 with AVX512_BF16, busy machine,
// minimum of repeated calls): at M = 128 the GEMV took 1.25 ms (1536x576) and 112 ms
// (4096x4096) against 2.5 ms and 342 ms for decode + MKL fp32 GEMM, so it keeps M <= 128
// there, as qlinear does; on AVX-512 CPUs without BF16 (Intel, where MKL is at home) and on
// AVX2 the crossover is assumed as for qlinear's fp32 path (not measured here).
// Tiny layers stay on the GEMV kernels (GEMM packing and thread start-up dominate there).
bool lut_use_gemv(Isa isa, int64_t M, int64_t N, int64_t Kp) {
  if (const int64_t forced = switches::gemv_max_m(); forced >= 0) return M <= forced;
  if (N * Kp < (int64_t(1) << 18)) return true;
  switch (isa) {
    case Isa::Avx512Bf16: return M <= 128;
    case Isa::Avx512: return M <= 32;
    case Isa::Avx2: return M <= 16;
    default: return M <= 1;
  }
}

struct LutFns {
  LutGemvFn gemv;
  LutDequantFn dequant;
};

LutFns lut_fns_for(Isa isa) {
  switch (isa) {
#if defined(HFQUANT_X86)
    case Isa::Avx512Bf16:
    case Isa::Avx512: return {lut_gemv_avx512, lut_dequant_avx512};
    case Isa::Avx2: return {lut_gemv_avx2, lut_dequant_avx2};
#endif
    default: return {lut_gemv_portable, lut_dequant_portable};
  }
}

}  // namespace

// qweight : uint8 [N, ceil(K * bits / 8)]: each row a little-endian bit stream, index k in
//           bits [bits*k, bits*k + bits) (docs/formats.md)
// codebook: float32/bfloat16/float16 [N, G, 2^bits], G = ceil(K / group_size) (1 for -1)
// Returns (idx uint8 [N, Kp/2], tab float32 [N, G, 16]) in the layout of lut_linear.h.
std::tuple<at::Tensor, at::Tensor> lut_repack_cpu(const at::Tensor& qweight, const at::Tensor& codebook, int64_t bits,
                                                  int64_t group_size, int64_t in_features) {
  TORCH_CHECK(qweight.dim() == 2, "hfquant::lut_repack: qweight must be 2-D, got ", qweight.dim(), "-D");
  const int64_t N = qweight.size(0), K = in_features;
  check_lut_args("lut_repack", bits, group_size, N, K);
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "hfquant::lut_repack: qweight must be uint8, got ",
              qweight.scalar_type());
  const int64_t qcols = (K * bits + 7) / 8;
  TORCH_CHECK(qweight.size(1) == qcols, "hfquant::lut_repack: qweight has ", qweight.size(1),
              " columns, expected ceil(in_features * bits / 8)=", qcols, " for bits=", bits, ", in_features=", K);
  int64_t gs, G;
  lut_groups(group_size, K, gs, G);
  const int64_t E = int64_t(1) << bits;
  TORCH_CHECK(codebook.dim() == 3 && codebook.size(0) == N && codebook.size(1) == G && codebook.size(2) == E,
              "hfquant::lut_repack: codebook has shape ", codebook.sizes(), ", expected [", N, ", ", G, ", ", E,
              "] for bits=", bits, ", group_size=", group_size);
  TORCH_CHECK(is_float(codebook.scalar_type()), "hfquant::lut_repack: codebook must be float32, bfloat16 or "
              "float16, got ", codebook.scalar_type());
  TORCH_CHECK(qweight.device().is_cpu() && codebook.device().is_cpu(),
              "hfquant::lut_repack: CPU kernel called with tensors on ", qweight.device(), " and ",
              codebook.device());

  const int64_t Kp = round_up(K, kLutUnitK), rb = Kp / 2;
  at::Tensor idx = at::zeros({N, rb}, qweight.options());
  at::Tensor tab = at::zeros({N, G, kLutTable}, codebook.options().dtype(at::kFloat));
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const at::Tensor qw = qweight.contiguous();
  const float* c = cb.data_ptr<float>();
  for (int64_t i = 0; i < N * G * E; ++i)
    TORCH_CHECK(std::isfinite(c[i]), "hfquant::lut_repack: codebook contains NaN or Inf (row ", i / (G * E),
                ", group ", (i / E) % G, ", entry ", i % E, ")");
  const uint8_t* q = qw.data_ptr<uint8_t>();
  uint8_t* io = idx.data_ptr<uint8_t>();
  float* to = tab.data_ptr<float>();
  const unsigned mask = unsigned(E - 1);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = q + n * qcols;
      uint8_t* dst = io + n * rb;
      for (int64_t k = 0; k < K; ++k) {
        // index k spans bits [bits*k, bits*k + bits): at most two bytes (3-bit indices cross)
        const int64_t bit = k * bits, byte = bit >> 3;
        unsigned v = row[byte];
        if ((bit & 7) + bits > 8) v |= unsigned(row[byte + 1]) << 8;
        v = (v >> (bit & 7)) & mask;
        const int64_t j = k % kLutUnitK;
        dst[(k / kLutUnitK) * 16 + (j & 15)] |= uint8_t(j < 16 ? v : v << 4);
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t e = 0; e < E; ++e) to[(n * G + g) * kLutTable + e] = c[(n * G + g) * E + e];
    }
  });
  return {idx, tab};
}

namespace {

// fp32 [M][Kp] zero-padded copy of x (rows with stride ldx, k contiguous).
template <typename T>
void prepare_rows(const T* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const T* src = x + m * ldx;
    float* dst = out + m * Kp;
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(src[k]);
    std::fill(dst + K, dst + Kp, 0.f);
  }
}

}  // namespace

// x       : float32/bfloat16/float16 [..., K], any strides
// idx, tab: from lut_repack (uint8 [N, Kp/2], float32 [N, G, 16])
// bias    : optional [N], any floating dtype
// returns : x.dtype [..., N]
at::Tensor lut_linear_cpu(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& tab,
                          const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                          int64_t out_features, int64_t in_features) {
  const int64_t N = out_features, K = in_features;
  check_lut_args("lut_linear", bits, group_size, N, K);
  TORCH_CHECK(x.device().is_cpu(), "hfquant::lut_linear: x is on ", x.device(), " but this is the CPU kernel");
  TORCH_CHECK(is_float(x.scalar_type()), "hfquant::lut_linear: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "hfquant::lut_linear: x has last dimension ",
              x.dim() ? x.size(-1) : 0, ", expected in_features=", K);
  int64_t gs, G;
  lut_groups(group_size, K, gs, G);
  const int64_t Kp = round_up(K, kLutUnitK);
  TORCH_CHECK(idx.scalar_type() == at::kByte && idx.is_contiguous() && idx.device().is_cpu(),
              "hfquant::lut_linear: packed indices must be a contiguous uint8 CPU tensor (from hfquant::lut_repack)");
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == N && idx.size(1) == Kp / 2, "hfquant::lut_linear: packed indices "
              "have shape ", idx.sizes(), ", expected [", N, ", ", Kp / 2, "] for out_features=", N,
              ", in_features=", K);
  TORCH_CHECK(tab.scalar_type() == at::kFloat && tab.is_contiguous() && tab.device().is_cpu(),
              "hfquant::lut_linear: packed codebook must be a contiguous float32 CPU tensor (from hfquant::lut_repack)");
  TORCH_CHECK(tab.dim() == 3 && tab.size(0) == N && tab.size(1) == G && tab.size(2) == kLutTable,
              "hfquant::lut_linear: packed codebook has shape ", tab.sizes(), ", expected [", N, ", ", G,
              ", 16] for group_size=", group_size, ", in_features=", K);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "hfquant::lut_linear: bias has shape ", bias->sizes(),
                ", expected [", N, "]");
    TORCH_CHECK(bias->is_floating_point() && bias->device().is_cpu(),
                "hfquant::lut_linear: bias must be a floating point CPU tensor");
  }

  const LutView p{idx.data_ptr<uint8_t>(), tab.data_ptr<float>(), N, K, Kp, G, gs};
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  const at::Tensor x2d = x.reshape({-1, K});
  const int64_t M = x2d.size(0);
  if (M == 0) return at::empty(out_sizes, x.options());
  const Isa isa = active_isa();
  const LutFns fns = lut_fns_for(isa);
  at::Tensor b32;
  if (bias) b32 = bias->to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (lut_use_gemv(isa, M, N, Kp)) {
    // x once to fp32, zero padded to Kp, so the kernels read whole 32-k units.
    const at::Tensor xk = x2d.stride(1) == 1 ? x2d : x2d.contiguous();
    at::Tensor xp = at::empty({M, Kp}, x.options().dtype(at::kFloat));
    dispatch_float(x.scalar_type(), "lut_linear", "x", [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      prepare_rows(static_cast<const T*>(xk.data_ptr()), xk.stride(0), M, K, Kp, xp.data_ptr<float>());
    });
    const float* xs = xp.data_ptr<float>();
    float* yo = y.data_ptr<float>();
    const float* bo = bias ? b32.data_ptr<float>() : nullptr;
    const LutGemvFn kern = fns.gemv;
    // Blocks of 32 rows per task: enough work per thread to cover the scheduling cost.
    at::parallel_for(0, (N + 3) / 4, 8, [&](int64_t b0, int64_t b1) {
      kern(p, xs, M, yo, N, bo, b0 * 4, std::min(N, b1 * 4));
    });
  } else {
    // Blocked path: decode ~16 MiB of rows to fp32, then ATen's GEMM on them.
    const at::Tensor xc = x2d.to(at::kFloat).contiguous();
    const int64_t rows = std::max<int64_t>(4, std::min(N, (int64_t(16) << 20) / (Kp * 4)));
    at::Tensor wbuf = at::empty({rows, Kp}, x.options().dtype(at::kFloat));
    const LutDequantFn deq = fns.dequant;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / Kp);
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t n1 = std::min(N, n0 + rows);
      float* wb = wbuf.data_ptr<float>();
      at::parallel_for(n0, n1, grain, [&](int64_t a0, int64_t a1) { deq(p, wb + (a0 - n0) * Kp, Kp, a0, a1); });
      at::Tensor yblk = y.narrow(1, n0, n1 - n0);
      at::mm_out(yblk, xc, wbuf.narrow(0, 0, n1 - n0).narrow(1, 0, K).t());
    }
    if (bias) y.add_(b32);
  }
  if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
  return y.reshape(out_sizes);
}

}  // namespace hfquant::cpu

TORCH_LIBRARY_IMPL(hfquant, CPU, m) {
  m.impl("lut_repack", &hfquant::cpu::lut_repack_cpu);
  m.impl("lut_linear", &hfquant::cpu::lut_linear_cpu);
}
