// hfquant::qlinear_routed on CPU: the routed-expert linear of MoE layers over the stacked
// kernel layouts of E experts. Rows are sorted by expert (a stable counting sort). Experts
// whose row count qlinear serves with the GEMV kernels are computed here: their rows
// prepared once, then one parallel region over (expert, tile range) pairs, so that a decode
// step (top_k rows on top_k experts) keeps every thread busy. An expert with more rows is
// handed to qlinear itself on its gathered rows. Either way each expert's rows come out bit
// for bit as qlinear gives them, and only the selected experts' weights are read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/aten_util.h"
#include "cpu/qlinear.h"

namespace hfquant::cpu {

// csrc/cpu/qlinear.cpp
at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                       const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                       int64_t out_features, int64_t in_features);

namespace {

// One expert served by the GEMV kernels: its weights, its prepared rows, where its outputs go.
struct GemvJob {
  PackedView p;
  ActView a;
  OutView o;
};

}  // namespace

RoutedCall check_routed_call(const char* op, const at::Tensor& x, const at::Tensor& packed_weight,
                             const at::Tensor& packed_scales, const at::Tensor& expert_ids,
                             const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                             int64_t out_features, int64_t in_features) {
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % 32 == 0), "hfquant::", op, ": group_size=",
              group_size, " must be -1 (per channel) or a positive multiple of 32");
  const int64_t N = out_features, K = in_features;
  TORCH_CHECK(N > 0 && K > 0, "hfquant::", op, ": out_features=", N, " and in_features=", K, " must be positive");
  TORCH_CHECK(x.device().is_cpu(), "hfquant::", op, ": x is on ", x.device(),
              " but this is the CPU kernel (is the CUDA extension built?)");
  TORCH_CHECK(is_float(x.scalar_type()), "hfquant::", op, ": x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "hfquant::", op, ": x has shape ", x.sizes(),
              ", expected [rows, in_features=", K, "]");
  const int64_t R = x.size(0);
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong || expert_ids.scalar_type() == at::kInt, "hfquant::", op,
              ": expert_ids must be int64 or int32, got ", expert_ids.scalar_type());
  TORCH_CHECK(expert_ids.device().is_cpu(), "hfquant::", op, ": expert_ids is on ", expert_ids.device(),
              " but this is the CPU kernel");
  TORCH_CHECK(expert_ids.dim() == 1 && expert_ids.size(0) == R, "hfquant::", op, ": expert_ids has shape ",
              expert_ids.sizes(), ", expected [", R, "] (one expert per row of x)");

  const int64_t Kp = round_up(K, kKAlign), T = (N + kNR - 1) / kNR, U = Kp / (bits == 4 ? 32 : 16);
  const int64_t G = group_size == -1 ? 1 : (K + group_size - 1) / group_size;
  const int64_t gs = group_size == -1 ? Kp : group_size;
  TORCH_CHECK(packed_weight.scalar_type() == at::kByte && packed_weight.is_contiguous() &&
                  packed_weight.device().is_cpu(),
              "hfquant::", op, ": packed_weight must be a contiguous uint8 CPU tensor (hfquant::repack's "
              "packed_weight of each expert, stacked)");
  TORCH_CHECK(packed_weight.dim() == 5 && packed_weight.size(0) > 0 && packed_weight.size(1) == T &&
                  packed_weight.size(2) == U && packed_weight.size(3) == kNR && packed_weight.size(4) == 16,
              "hfquant::", op, ": packed_weight has shape ", packed_weight.sizes(), ", expected [E, ", T, ", ", U,
              ", 4, 16] (E >= 1 experts) for bits=", bits, ", out_features=", N, ", in_features=", K);
  const int64_t E = packed_weight.size(0);
  TORCH_CHECK(packed_scales.scalar_type() == at::kFloat && packed_scales.is_contiguous() &&
                  packed_scales.device().is_cpu(),
              "hfquant::", op, ": packed_scales must be a contiguous float32 CPU tensor (hfquant::repack's "
              "packed_scales of each expert, stacked)");
  TORCH_CHECK(packed_scales.dim() == 5 && packed_scales.size(1) == T && packed_scales.size(2) == G &&
                  packed_scales.size(3) == 2 && packed_scales.size(4) == kNR,
              "hfquant::", op, ": packed_scales has shape ", packed_scales.sizes(), ", expected [E, ", T, ", ", G,
              ", 2, 4] for group_size=", group_size, ", out_features=", N, ", in_features=", K);
  TORCH_CHECK(packed_scales.size(0) == E, "hfquant::", op, ": packed_weight holds ", E,
              " experts but packed_scales holds ", packed_scales.size(0));
  if (bias) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == N, "hfquant::", op, ": bias has shape ",
                bias->sizes(), ", expected [", E, ", ", N, "] (experts, out_features)");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() || bias->scalar_type() == at::kFloat, "hfquant::", op,
                ": bias must be ", x.scalar_type(), " (like x) or float32, got ", bias->scalar_type());
    TORCH_CHECK(bias->device().is_cpu(), "hfquant::", op, ": bias is on ", bias->device(),
                " but this is the CPU kernel");
  }

  // Stable counting sort of the rows by expert: sorted position i holds row perm[i]; the rows
  // of expert e are perm[start[e] .. start[e + 1]), in their order in x.
  RoutedCall c{PackedGeometry{gs, G, Kp, T, U}, E, std::vector<int64_t>(E + 1, 0), {}};
  const at::Tensor ids = expert_ids.to(at::kLong).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < E, "hfquant::", op, ": expert id ", id[r], " at row ", r,
                " is out of range for ", E, " experts");
    ++c.start[id[r] + 1];
  }
  for (int64_t e = 0; e < E; ++e) c.start[e + 1] += c.start[e];
  c.perm = at::empty({R}, ids.options());
  int64_t* perm = c.perm.data_ptr<int64_t>();
  std::vector<int64_t> next(c.start.begin(), c.start.end() - 1);
  for (int64_t r = 0; r < R; ++r) perm[next[id[r]]++] = r;
  return c;
}

void scatter_rows(uint8_t* y, const uint8_t* src, const int64_t* dst, int64_t R, int64_t row_bytes) {
  at::parallel_for(0, R, std::max<int64_t>(1, (int64_t(1) << 16) / row_bytes), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::memcpy(y + dst[i] * row_bytes, src + i * row_bytes, row_bytes);
  });
}

// x            : float32/bfloat16/float16 [R, K], any strides
// packed_weight: uint8 [E, T, Kp/32 (4-bit) or Kp/16 (8-bit), 4, 16]  (repack of each expert, stacked)
// packed_scales: float32 [E, T, G, 2, 4]                               (the same)
// expert_ids   : int64 or int32 [R], each in [0, E)
// bias         : optional [E, N], x.dtype or float32
// returns      : x.dtype [R, N], y[r] = x[r] @ W[e]^T + bias[e] with e = expert_ids[r]
at::Tensor qlinear_routed_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                              const at::Tensor& expert_ids, const std::optional<at::Tensor>& bias, int64_t bits,
                              int64_t group_size, int64_t out_features, int64_t in_features) {
  TORCH_CHECK(bits == 4 || bits == 8, "hfquant::qlinear_routed: bits=", bits, " is not supported (use 4 or 8)");
  const RoutedCall call = check_routed_call("qlinear_routed", x, packed_weight, packed_scales, expert_ids, bias, bits,
                                            group_size, out_features, in_features);
  const int64_t N = out_features, K = in_features, R = x.size(0);
  const int64_t Kp = call.geo.Kp, T = call.geo.T, U = call.geo.U, G = call.geo.G, gs = call.geo.gs, E = call.E;
  const std::vector<int64_t>& start = call.start;
  const at::Tensor& perm_t = call.perm;
  const int64_t* perm = perm_t.data_ptr<int64_t>();
  at::Tensor y = at::empty({R, N}, x.options());
  if (R == 0) return y;

  const DType xt = dtype_of(x.scalar_type());
  const GemvPlan plan = qlinear_gemv_plan(xt, bits, N, Kp);
  // Experts present, split into the GEMV ones (rows compacted in expert order) and the rest.
  std::vector<int64_t> gemv_experts, big_experts, gemv_row0;  // gemv_row0: first compact row
  std::vector<int64_t> gemv_src;                              // compact row -> row of x
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = start[e + 1] - start[e];
    if (c == 0) continue;
    if (c <= plan.max_m) {
      gemv_experts.push_back(e);
      gemv_row0.push_back(int64_t(gemv_src.size()));
      gemv_src.insert(gemv_src.end(), perm + start[e], perm + start[e + 1]);
    } else {
      big_experts.push_back(e);
    }
  }

  const uint8_t* pw = packed_weight.data_ptr<uint8_t>();
  const float* psb = packed_scales.data_ptr<float>();
  const int64_t w_stride = T * U * kNR * 16, sb_stride = T * G * 2 * kNR;
  if (!gemv_experts.empty()) {
    const int64_t Rg = int64_t(gemv_src.size()), n_exp = int64_t(gemv_experts.size());
    const at::Tensor xk = x.stride(1) == 1 ? x : x.contiguous();
    const int64_t ldx = xk.stride(0), xes = xk.element_size();
    const uint8_t* xp = static_cast<const uint8_t*>(xk.data_ptr());
    const bool split = plan.split;
    const int64_t xbytes = round_up(Rg * Kp * 4, 64), sbytes = round_up(Rg * G * 4, 64);
    const int64_t hbytes = split ? round_up(Rg * Kp * 2, 64) : 0;
    at::Tensor buf_t = at::empty({xbytes + sbytes + 2 * hbytes}, x.options().dtype(at::kByte));
    uint8_t* buf = buf_t.data_ptr<uint8_t>();
    float* xo = reinterpret_cast<float*>(buf);
    float* xs = reinterpret_cast<float*>(buf + xbytes);
    uint16_t* xhi = split ? reinterpret_cast<uint16_t*>(buf + xbytes + sbytes) : nullptr;
    uint16_t* xlo = split ? reinterpret_cast<uint16_t*>(buf + xbytes + sbytes + hbytes) : nullptr;
    // prepare works row by row; each compact row from its row of x (any PackedView gives the
    // geometry: every expert shares it)
    const PackedView geo{pw, psb, bits, N, K, Kp, T, G, gs};
    const int64_t pgrain = std::max<int64_t>(1, (int64_t(1) << 16) / Kp);
    at::parallel_for(0, Rg, pgrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        plan.prepare(xp + gemv_src[i] * ldx * xes, xt, ldx, 1, geo, split, xo + i * Kp, xs + i * G,
                     split ? xhi + i * Kp : nullptr, split ? xlo + i * Kp : nullptr);
    });
    // bias rows of these experts in float32, as qlinear converts them
    // (a contiguous float32 bias is read in place, row e; else rows j of b32)
    const bool bias_in_place = bias && bias->scalar_type() == at::kFloat && bias->is_contiguous();
    at::Tensor b32;
    if (bias && !bias_in_place)
      b32 = bias->index_select(0, at::tensor(gemv_experts, perm_t.options())).to(at::kFloat).contiguous();
    // outputs of the compact rows, copied to their rows of y below
    at::Tensor yg = at::empty({Rg, N}, x.options());
    uint8_t* ygp = static_cast<uint8_t*>(yg.data_ptr());
    const int64_t yes = yg.element_size();
    std::vector<GemvJob> jobs(n_exp);
    for (int64_t j = 0; j < n_exp; ++j) {
      const int64_t e = gemv_experts[j], r0 = gemv_row0[j];
      const int64_t c = start[e + 1] - start[e];
      const float* bp = nullptr;
      if (bias) bp = bias_in_place ? bias->data_ptr<float>() + e * N : b32.data_ptr<float>() + j * N;
      jobs[j].p = PackedView{pw + e * w_stride, psb + e * sb_stride, bits, N, K, Kp, T, G, gs};
      jobs[j].a = ActView{xo + r0 * Kp, xs + r0 * G, split ? xhi + r0 * Kp : nullptr,
                          split ? xlo + r0 * Kp : nullptr, split && xt != DType::BF16, c};
      jobs[j].o = OutView{ygp + r0 * N * yes, xt, N, bp};
    }
    // Work items: (expert j, step q of kGemvTileStep tiles), j major; a task's range of items
    // may span several experts. Grain as qlinear's: 8 tiles.
    const int64_t Q = (T + kGemvTileStep - 1) / kGemvTileStep;
    const GemvKernel kern = plan.gemv;
    at::parallel_for(0, n_exp * Q, 8 / kGemvTileStep, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1;) {
        const int64_t j = i / Q, q0 = i % Q, q1 = std::min(Q, q0 + (i1 - i));
        kern(jobs[j].p, jobs[j].a, jobs[j].o, q0 * kGemvTileStep, std::min(T, q1 * kGemvTileStep));
        i += q1 - q0;
      }
    });
    scatter_rows(static_cast<uint8_t*>(y.data_ptr()), ygp, gemv_src.data(), Rg, N * yes);
  }
  // Experts with more rows: qlinear on their gathered rows (its Gemm or blocked path).
  for (const int64_t e : big_experts) {
    const at::Tensor rows = perm_t.narrow(0, start[e], start[e + 1] - start[e]);
    const std::optional<at::Tensor> be = bias ? std::optional<at::Tensor>(bias->select(0, e)) : std::nullopt;
    const at::Tensor ye = qlinear_cpu(x.index_select(0, rows), packed_weight.select(0, e),
                                      packed_scales.select(0, e), be, bits, group_size, N, K);
    y.index_copy_(0, rows, ye);
  }
  return y;
}

}  // namespace hfquant::cpu

TORCH_LIBRARY_IMPL(hfquant, CPU, m) { m.impl("qlinear_routed", &hfquant::cpu::qlinear_routed_cpu); }
