// hfquant::rms_norm on CPU: the RMSNorm of Llama-family decoders as one op (the module's
// own forward is seven ATen calls, each dispatched from Python, per norm and token).
//   x [..., D] float32 / bfloat16 / float16, any strides; weight [D] float32 / bfloat16 / float16;
//   eps >= 0 -> y [..., D] contiguous, in the dtype torch promotes x and weight to, with
//   v = mean_k x[k]^2                          (float32: ATen's own pow and mean, so the sum's
//                                               order, and every bit, is the module's)
//   h = x * (1 / sqrt(v + eps)), rounded to x's dtype
//   y = weight * h                            (a float32 product rounded to y's dtype)
// which is `weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(x.dtype)` bit for
// bit: the elementwise steps are the same IEEE operations in the same order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/aten_util.h"

namespace hfquant::cpu {

namespace {

template <typename X, typename W, typename Y>
void rms_rows(const X* x, const float* var, const W* w, Y* y, int64_t rows, int64_t D, float eps) {
  std::vector<float> wf(D);
  for (int64_t k = 0; k < D; ++k) wf[k] = static_cast<float>(w[k]);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const X* xr = x + r * D;
      Y* yr = y + r * D;
      const float inv = 1.0f / std::sqrt(var[r] + eps);
      for (int64_t j = 0; j < D; ++j) {
        const X h = static_cast<X>(static_cast<float>(xr[j]) * inv);
        yr[j] = static_cast<Y>(wf[j] * static_cast<float>(h));
      }
    }
  });
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() >= 1, "hfquant::rms_norm: x must have at least one dimension, got a scalar");
  TORCH_CHECK(weight.device() == x.device(), "hfquant::rms_norm: weight is on ", weight.device(), ", x on ",
              x.device());
  TORCH_CHECK(is_float(x.scalar_type()), "hfquant::rms_norm: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(is_float(weight.scalar_type()), "hfquant::rms_norm: weight must be float32, bfloat16 or float16, got ",
              weight.scalar_type());
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, "hfquant::rms_norm: weight must be a vector of ", D,
              " values (the last dimension of x), got shape ", weight.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "hfquant::rms_norm: eps must be a finite number >= 0, got ", eps);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(at::promote_types(x.scalar_type(), weight.scalar_type())));
  const int64_t rows = D ? x.numel() / D : 0;
  if (rows == 0) return y;
  // the mean of squares by ATen's own kernels, as the module computes it
  const at::Tensor xf = xc.scalar_type() == at::kFloat ? xc : xc.to(at::kFloat);
  const at::Tensor var = at::mean(at::pow(xf, 2), {-1}, /*keepdim=*/true).contiguous();
  dispatch_float(x.scalar_type(), "rms_norm", "x", [&](auto* xt) {
    using X = std::remove_pointer_t<decltype(xt)>;
    dispatch_float(weight.scalar_type(), "rms_norm", "weight", [&](auto* wt) {
      using W = std::remove_pointer_t<decltype(wt)>;
      dispatch_float(y.scalar_type(), "rms_norm", "y", [&](auto* yt) {
        using Y = std::remove_pointer_t<decltype(yt)>;
        rms_rows<X, W, Y>(xc.data_ptr<X>(), var.data_ptr<float>(), wc.data_ptr<W>(), y.data_ptr<Y>(), rows, D,
                          static_cast<float>(eps));
      });
    });
  });
  return y;
}

}  // namespace

}  // namespace hfquant::cpu

TORCH_LIBRARY_IMPL(hfquant, CPU, m) { m.impl("rms_norm", &hfquant::cpu::rms_norm_cpu); }
