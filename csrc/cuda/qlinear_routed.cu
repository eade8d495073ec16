// hfquant::qlinear_routed on CUDA: a host loop over the experts present, each calling
// qlinear's CUDA implementation on its rows (index_select) and writing them back
// (index_copy_). Correct, not fast: the expert ids are read on the host (one sync) and
// each expert is its own set of launches. A fused kernel (one launch over the rows sorted
// by expert, a grid over experts x tiles) is future work.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cuda/common.cuh"

namespace hfquant::cuda {

// csrc/cuda/qlinear.cu
at::Tensor qlinear_cuda(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                        const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t out_features,
                        int64_t in_features);

// x [R, K] float32/bfloat16/float16; packed_weight uint8 [E, Np, Kp*bits/8] and packed_scales
// float32 [E, G, 1|2, Np]: repack_cuda's outputs of E experts, stacked; expert_ids int64/int32
// [R] in [0, E); bias optional [E, N], x.dtype or float32. Returns y [R, N] in x.dtype.
at::Tensor qlinear_routed_cuda(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                               const at::Tensor& expert_ids, const std::optional<at::Tensor>& bias, int64_t bits,
                               int64_t group_size, int64_t out_features, int64_t in_features) {
  const char* op = "qlinear_routed";
  const int64_t N = out_features, K = in_features;
  HQ_CHECK(bits == 4 || bits == 8, "hfquant::qlinear_routed: bits=", bits, " is not supported (use 4 or 8)");
  HQ_CHECK(N > 0 && K > 0, "hfquant::qlinear_routed: out_features=", N, " and in_features=", K,
           " must be positive");
  const at::Device dev = cuda_device({&x, &packed_weight, &packed_scales, &expert_ids, opt(bias)});
  check_device(op, "x", x, dev);
  check_device(op, "packed_weight", packed_weight, dev);
  check_device(op, "packed_scales", packed_scales, dev);
  check_device(op, "expert_ids", expert_ids, dev);
  if (bias) check_device(op, "bias", *bias, dev);
  check_capability(op, dev);
  HQ_CHECK(is_float(x.scalar_type()), "hfquant::qlinear_routed: x must be float32, bfloat16 or float16, got ",
           x.scalar_type());
  HQ_CHECK(x.dim() == 2 && x.size(1) == K, "hfquant::qlinear_routed: x has shape ", x.sizes(),
           ", expected [rows, in_features=", K, "]");
  const int64_t R = x.size(0);
  HQ_CHECK(expert_ids.scalar_type() == at::kLong || expert_ids.scalar_type() == at::kInt,
           "hfquant::qlinear_routed: expert_ids must be int64 or int32, got ", expert_ids.scalar_type());
  HQ_CHECK(expert_ids.dim() == 1 && expert_ids.size(0) == R, "hfquant::qlinear_routed: expert_ids has shape ",
           expert_ids.sizes(), ", expected [", R, "] (one expert per row of x)");
  HQ_CHECK(packed_weight.dim() == 3 && packed_weight.size(0) > 0,
           "hfquant::qlinear_routed: packed_weight has shape ", packed_weight.sizes(),
           ", expected [E, Np, Kp*bits/8] (hfquant::repack's CUDA packed_weight of E >= 1 experts, stacked)");
  const int64_t E = packed_weight.size(0);
  HQ_CHECK(packed_scales.dim() == 4, "hfquant::qlinear_routed: packed_scales has shape ", packed_scales.sizes(),
           ", expected [E, G, 1|2, Np] (hfquant::repack's CUDA packed_scales of each expert, stacked)");
  HQ_CHECK(packed_scales.size(0) == E, "hfquant::qlinear_routed: packed_weight holds ", E,
           " experts but packed_scales holds ", packed_scales.size(0));
  if (bias) {
    HQ_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == N,
             "hfquant::qlinear_routed: bias has shape ", bias->sizes(), ", expected [", E, ", ", N,
             "] (experts, out_features)");
    HQ_CHECK(bias->scalar_type() == x.scalar_type() || bias->scalar_type() == at::kFloat,
             "hfquant::qlinear_routed: bias must be ", x.scalar_type(), " (like x) or float32, got ",
             bias->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor y = at::empty({R, N}, x.options());
  if (R == 0) return y;

  // Stable counting sort of the rows by expert on the host (the one sync).
  const at::Tensor ids = expert_ids.to(at::kLong).cpu();
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    HQ_CHECK(id[r] >= 0 && id[r] < E, "hfquant::qlinear_routed: expert id ", id[r], " at row ", r,
             " is out of range for ", E, " experts");
    ++start[id[r] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  at::Tensor perm = at::empty({R}, ids.options());
  {
    int64_t* p = perm.data_ptr<int64_t>();
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < R; ++r) p[next[id[r]]++] = r;
  }
  const at::Tensor perm_d = perm.to(dev);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = start[e + 1] - start[e];
    if (c == 0) continue;
    const at::Tensor rows = perm_d.narrow(0, start[e], c);
    const std::optional<at::Tensor> be = bias ? std::optional<at::Tensor>(bias->select(0, e)) : std::nullopt;
    const at::Tensor ye = qlinear_cuda(x.index_select(0, rows), packed_weight.select(0, e),
                                       packed_scales.select(0, e), be, bits, group_size, N, K);
    y.index_copy_(0, rows, ye);
  }
  return y;
}

}  // namespace hfquant::cuda

TORCH_LIBRARY_IMPL(hfquant, CUDA, m) { m.impl("qlinear_routed", &hfquant::cuda::qlinear_routed_cuda); }
