// int8 activations on CUDA (W8A8, LLM.int8()): int8_pack, quantize_act, int8_mm,
// int8_gemm, int8_linear.
//
// Layout: packed_weight int8 [Np, Kp] = the int8 weights, rows padded with zeros to
// Np = round_up(N, 16), columns to Kp = round_up(K, 16): row-major W, handed to cuBLASLt's
// int8 GEMM (IMMA tensor cores, exact int32 accumulation) as the column-major B = W^T it
// prefers ("TN"), through at::_int_mm; or (the cuda_int8_lt switch, off by default until measured on a GPU)
// called here with cuBLASLt's heuristic choice and a workspace (lt_int8_mm): at::_int_mm passes
// neither (no algorithm, workspace 0), which keeps cuBLASLt on its workspace-free kernels; if
// cuBLASLt refuses a shape, at::_int_mm runs it. Activations are quantized straight into a
// zero-padded [Mp, Kp] buffer (Mp >= 17: cuBLASLt's int8 path wants M > 16), and one
// epilogue kernel applies x_scales[m] * w_scales[n], the LLM.int8 outlier product and bias.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda/common.cuh"

namespace hfquant::cuda {
namespace {

constexpr int64_t kPadN = 16, kPadK = 16, kMinRows = 17;

// cuBLASLt's int8 path (at::_int_mm) wants more than 16 rows; fewer are zero padded.
int64_t padded_rows(int64_t M) { return std::max<int64_t>(M, kMinRows); }

struct WeightInfo {
  int64_t N, Np, Kp;
};

WeightInfo check_weight(const char* op, const at::Tensor& pw, const at::Tensor& colsum, int64_t N,
                        const at::Device& dev) {
  check_device(op, "packed_weight", pw, dev);
  check_device(op, "colsum", colsum, dev);
  HQ_CHECK(N > 0, "hfquant::", op, ": out_features=", N, " must be positive");
  HQ_CHECK(pw.scalar_type() == at::kChar && pw.is_contiguous() && pw.dim() == 2,
              "hfquant::", op, ": packed_weight must be a contiguous int8 CUDA tensor [Np, Kp] from "
              "hfquant::int8_pack, got ", pw.scalar_type(), " ", pw.sizes());
  const int64_t Np = round_up(N, kPadN);
  HQ_CHECK(pw.size(0) == Np, "hfquant::", op, ": packed_weight has ", pw.size(0), " rows, expected ", Np,
              " for out_features=", N);
  HQ_CHECK(pw.size(1) > 0 && pw.size(1) % kPadK == 0, "hfquant::", op, ": packed_weight has ", pw.size(1),
              " columns, expected a positive multiple of ", kPadK);
  HQ_CHECK(colsum.scalar_type() == at::kInt && colsum.is_contiguous() && colsum.dim() == 1 && colsum.size(0) == N,
              "hfquant::", op, ": colsum must be a contiguous int32 tensor [", N, "] from hfquant::int8_pack, got ",
              colsum.scalar_type(), " ", colsum.sizes());
  return {N, Np, pw.size(1)};
}

void check_k(const char* op, const char* what, int64_t K, const WeightInfo& w) {
  HQ_CHECK(K <= w.Kp && K > w.Kp - kPadK, "hfquant::", op, ": ", what, " has ", K,
              " columns, but packed_weight holds in_features in (", w.Kp - kPadK, ", ", w.Kp, "]");
}

at::Tensor float_vector(const char* op, const char* what, const at::Tensor& t, int64_t n, const at::Device& dev) {
  check_device(op, what, t, dev);
  HQ_CHECK(t.dim() == 1 && t.size(0) == n, "hfquant::", op, ": ", what, " has shape ", t.sizes(), ", expected [",
              n, "]");
  HQ_CHECK(t.is_floating_point(), "hfquant::", op, ": ", what, " must be floating point, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

void check_threshold(const char* op, double threshold) {
  HQ_CHECK(!std::isnan(threshold) && threshold >= 0, "hfquant::", op, ": threshold=", threshold,
              " must be >= 0 (0 turns outlier detection off, inf keeps only non-finite values apart)");
}

template <typename F>
void dispatch_float(at::ScalarType t, const char* op, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    case at::kHalf: f(static_cast<c10::Half*>(nullptr)); break;
    default: HQ_CHECK(false, "hfquant::", op, ": ", what, " must be float32, bfloat16 or float16, got ", t);
  }
}

// Outlier columns: any row with !(|x * act_scale| < threshold) (NaN/Inf included). Plain
// stores of 1 from many threads are benign (same value).
template <typename X>
__global__ void outlier_mask_kernel(const X* __restrict__ x, const float* __restrict__ as, int64_t M, int64_t K,
                                    float threshold, int rows_per_block, uint8_t* __restrict__ mask) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const int64_t m0 = int64_t(blockIdx.y) * rows_per_block, m1 = min(M, m0 + rows_per_block);
  const float a = as ? as[k] : 1.f;
  bool hit = false;
  for (int64_t m = m0; m < m1 && !hit; ++m) {
    float v = float(x[m * K + k]);
    if (as) v = __fmul_rn(v, a);
    hit = !(fabsf(v) < threshold);
  }
  if (hit) mask[k] = 1;
}

__device__ __forceinline__ float block_max(float v, float* sh) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  __syncthreads();
  if (l == 0) sh[w] = v;
  __syncthreads();
  float r = sh[0];
  for (int i = 1; i < int(blockDim.x >> 5); ++i) r = fmaxf(r, sh[i]);
  return r;
}

// One block per row: absmax over the kept (non-outlier) columns, then the codes.
// Row rules (ref.quantize_act_ref): a NaN/Inf among the kept values -> scale NaN, codes 0;
// absmax a = 0 or 127 / a = inf -> scale 0, codes 0; else scale = a / 127 and
// q = clamp(round_half_even(v * (127 / a)), -127, 127). Outlier columns get 0, columns
// [K, ldq) are zero padding.
template <typename X>
__global__ void quantize_rows_kernel(const X* __restrict__ x, const float* __restrict__ as, int64_t K,
                                     const uint8_t* __restrict__ mask, int8_t* __restrict__ q, int64_t ldq,
                                     float* __restrict__ scales) {
  __shared__ float sh[32];
  const int64_t m = blockIdx.x;
  const X* xr = x + m * K;
  float amax = 0.f, bad = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    if (mask && mask[k]) continue;
    float v = float(xr[k]);
    if (as) v = __fmul_rn(v, as[k]);
    const float a = fabsf(v);
    if (!isfinite(a)) bad = 1.f;
    else amax = fmaxf(amax, a);
  }
  amax = block_max(amax, sh);
  bad = block_max(bad, sh);
  const float inv = __fdiv_rn(127.f, amax);
  const bool zero = bad != 0.f || amax == 0.f || isinf(inv);
  if (threadIdx.x == 0) scales[m] = bad != 0.f ? NAN : zero ? 0.f : __fdiv_rn(amax, 127.f);
  int8_t* qr = q + m * ldq;
  for (int64_t k = threadIdx.x; k < ldq; k += blockDim.x) {
    int8_t c = 0;
    if (k < K && !zero && !(mask && mask[k])) {
      float v = float(xr[k]);
      if (as) v = __fmul_rn(v, as[k]);
      const float r = rintf(__fmul_rn(v, inv));  // round half to even, like torch.round
      c = int8_t(fminf(127.f, fmaxf(-127.f, r)));
    }
    qr[k] = c;
  }
}

// x2 [M, K] contiguous float -> codes into q [.., ldq] (rows < M), scales [M]; returns outlier columns.
at::Tensor quantize_into(const char* op, const at::Tensor& x2, const at::Tensor& as, double threshold, int8_t* q,
                         int64_t ldq, float* scales) {
  const int64_t M = x2.size(0), K = x2.size(1);
  at::Tensor mask;
  at::Tensor cols = at::empty({0}, x2.options().dtype(at::kLong));
  const float* asp = as.defined() ? as.data_ptr<float>() : nullptr;
  if (M == 0) return cols;
  dispatch_float(x2.scalar_type(), op, "x", [&](auto* tag) {
    using X = std::remove_pointer_t<decltype(tag)>;
    const X* xp = x2.data_ptr<X>();
    if (threshold > 0) {
      mask = at::zeros({K}, x2.options().dtype(at::kByte));
      const int rpb = 64;
      const dim3 grid(unsigned(ceil_div(K, 256)), unsigned(ceil_div(M, rpb)));
      outlier_mask_kernel<X><<<grid, 256, 0, stream()>>>(xp, asp, M, K, float(threshold), rpb,
                                                          mask.data_ptr<uint8_t>());
      HFQUANT_CUDA_CHECK_LAUNCH();
      cols = mask.nonzero().flatten();  // data-dependent count: one sync
    }
    const uint8_t* mp = cols.numel() ? mask.data_ptr<uint8_t>() : nullptr;
    quantize_rows_kernel<X><<<unsigned(M), 256, 0, stream()>>>(xp, asp, K, mp, q, ldq, scales);
    HFQUANT_CUDA_CHECK_LAUNCH();
  });
  return cols;
}

// y[m, n] = acc[m, n] * (xs[m] * ws[n]) (+ add[m, n]) (+ bias[n]) in Y, each step rounded
// as the reference does it in fp32 (no fused multiply-add).
template <typename Y>
__global__ void epilogue_kernel(const int32_t* __restrict__ acc, int64_t ldc, const float* __restrict__ xs,
                                const float* __restrict__ ws, const float* __restrict__ add,
                                const float* __restrict__ bias, int64_t M, int64_t N, Y* __restrict__ y) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  const int64_t m = i / N, n = i % N;
  float v = __fmul_rn(float(acc[m * ldc + n]), __fmul_rn(xs[m], ws[n]));
  if (add) v = __fadd_rn(v, add[i]);
  if (bias) v = __fadd_rn(v, bias[n]);
  y[i] = Y(v);
}

// cuBLASLt int8 GEMM with a heuristic algorithm and a workspace: c [Mp, Np] int32 (row-major)
// = a [Mp, Kp] int8 @ pw [Np, Kp]^T. Column-major view: C^T [Np, Mp] = op_T(pw as [Kp, Np])
// x (a as [Kp, Mp]). Returns false (nothing launched) where cuBLASLt has no algorithm or
// refuses the call; the heuristic's answer is cached per shape and device.
// Used when the cuda_int8_lt switch is on (hfquant.settings.cuda_int8_lt; off by default until it is
// measured on a GPU), else every call takes at::_int_mm.
constexpr size_t kLtWorkspace = size_t(32) << 20;

struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  ~LtDescs() {
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
  }
  bool make(int64_t Mp, int64_t Np, int64_t Kp) {
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    return cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32I, CUDA_R_32I) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutCreate(&la, CUDA_R_8I, uint64_t(Kp), uint64_t(Np), Kp) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutCreate(&lb, CUDA_R_8I, uint64_t(Kp), uint64_t(Mp), Kp) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutCreate(&lc, CUDA_R_32I, uint64_t(Np), uint64_t(Mp), Np) == CUBLAS_STATUS_SUCCESS;
  }
};

bool lt_int8_mm(const at::Tensor& a, const at::Tensor& pw, at::Tensor& c) {
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  if (!aligned(a) || !aligned(pw) || !aligned(c)) return false;  // the IMMA kernels want 16-byte operands
  const int64_t Mp = a.size(0), Kp = a.size(1), Np = pw.size(0);
  using Key = std::tuple<int, int64_t, int64_t, int64_t>;
  struct Choice {
    bool ok;
    cublasLtMatmulAlgo_t algo;
  };
  static std::mutex mu;
  static std::map<Key, Choice> cache;
  const Key key{a.device().index(), Mp, Np, Kp};
  LtDescs d;
  if (!d.make(Mp, Np, Kp)) return false;
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  Choice choice{false, {}};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) {
      choice = it->second;
    } else {
      cublasLtMatmulPreference_t pref = nullptr;
      cublasLtMatmulHeuristicResult_t res{};
      int found = 0;
      const uint64_t ws = kLtWorkspace;
      if (cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS) {
        if (cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)) ==
                CUBLAS_STATUS_SUCCESS &&
            cublasLtMatmulAlgoGetHeuristic(handle, d.op, d.la, d.lb, d.lc, d.lc, pref, 1, &res, &found) ==
                CUBLAS_STATUS_SUCCESS &&
            found > 0 && res.state == CUBLAS_STATUS_SUCCESS && res.workspaceSize <= kLtWorkspace) {
          choice = {true, res.algo};
        }
        cublasLtMatmulPreferenceDestroy(pref);
      }
      cache[key] = choice;
      if (!choice.ok)  // once per shape: the switch is on, but this shape runs at::_int_mm
        TORCH_WARN(msg::cat("hfquant: cuBLASLt offers no int8 algorithm for M=", Mp, " N=", Np, " K=", Kp,
                            "; this shape uses at::_int_mm"));
    }
  }
  if (!choice.ok) return false;
  at::Tensor workspace = at::empty({int64_t(kLtWorkspace)}, a.options().dtype(at::kByte));
  const int32_t alpha = 1, beta = 0;
  const cublasStatus_t st =
      cublasLtMatmul(handle, d.op, &alpha, pw.data_ptr(), d.la, a.data_ptr(), d.lb, &beta, c.data_ptr(), d.lc,
                     c.data_ptr(), d.lc, &choice.algo, workspace.data_ptr(), kLtWorkspace, stream());
  if (st != CUBLAS_STATUS_SUCCESS) {  // refused (nothing launched): at::_int_mm runs this call
    TORCH_WARN_ONCE(msg::cat("hfquant: cuBLASLt refused its int8 algorithm (status ", int(st), ") for M=", Mp,
                             " N=", Np, " K=", Kp, "; at::_int_mm runs such calls"));
    return false;
  }
  return true;
}

// int8 [Mp, Kp] @ packed^T -> int32 [Mp, Np]: cuBLASLt with its heuristic choice, else at::_int_mm.
at::Tensor int_mm(const at::Tensor& a, const at::Tensor& pw) {
  if (switches::cuda_int8_lt()) {
    at::Tensor c = at::empty({a.size(0), pw.size(0)}, a.options().dtype(at::kInt));
    if (lt_int8_mm(a, pw, c)) return c;
  }
  return at::_int_mm(a, pw.t());
}

// User int8 activations [M, K] -> zero-padded [Mp, Kp]; refuses -128 like the CPU ops.
at::Tensor pad_act(const char* op, const at::Tensor& xq, const WeightInfo& w, const at::Device& dev) {
  check_device(op, "xq", xq, dev);
  HQ_CHECK(xq.scalar_type() == at::kChar, "hfquant::", op, ": xq must be int8, got ", xq.scalar_type());
  HQ_CHECK(xq.dim() == 2, "hfquant::", op, ": xq must be 2-D [M, K], got ", xq.dim(), "-D");
  check_k(op, "xq", xq.size(1), w);
  const int64_t M = xq.size(0), K = xq.size(1);
  if (M > 0) {
    HQ_CHECK(!(xq == -128).any().item<bool>(), "hfquant::", op, ": xq holds -128; int8 activations must lie in "
                "[-127, 127] (symmetric quantization, as hfquant::quantize_act produces)");
  }
  if (M == padded_rows(M) && K == w.Kp && xq.is_contiguous()) return xq;
  at::Tensor buf = at::zeros({padded_rows(M), w.Kp}, xq.options());
  buf.narrow(0, 0, M).narrow(1, 0, K).copy_(xq);
  return buf;
}

void run_epilogue(const at::Tensor& acc, const at::Tensor& xs, const at::Tensor& ws, const at::Tensor& add,
                  const at::Tensor& bias, int64_t M, int64_t N, at::Tensor& y, const char* op) {
  if (M == 0) return;
  dispatch_float(y.scalar_type(), op, "out_dtype", [&](auto* tag) {
    using Y = std::remove_pointer_t<decltype(tag)>;
    epilogue_kernel<Y><<<unsigned(ceil_div(M * N, 256)), 256, 0, stream()>>>(
        acc.data_ptr<int32_t>(), acc.stride(0), xs.data_ptr<float>(), ws.data_ptr<float>(),
        add.defined() ? add.data_ptr<float>() : nullptr, bias.defined() ? bias.data_ptr<float>() : nullptr, M, N,
        y.data_ptr<Y>());
  });
  HFQUANT_CUDA_CHECK_LAUNCH();
}

}  // namespace

// qweight int8 [N, K] -> (packed int8 [round_up(N,16), round_up(K,16)], colsum int32 [N]).
std::tuple<at::Tensor, at::Tensor> int8_pack_cuda(const at::Tensor& qweight) {
  HQ_CHECK(qweight.is_cuda(), "hfquant::int8_pack: qweight is on ", qweight.device(), ", expected a CUDA device");
  check_capability("int8_pack", qweight.device());
  HQ_CHECK(qweight.scalar_type() == at::kChar, "hfquant::int8_pack: qweight must be int8, got ",
              qweight.scalar_type());
  HQ_CHECK(qweight.dim() == 2 && qweight.size(0) > 0 && qweight.size(1) > 0,
              "hfquant::int8_pack: qweight must be a non-empty 2-D [out_features, in_features] tensor, got ",
              qweight.sizes());
  const c10::cuda::CUDAGuard guard(qweight.device());
  const int64_t N = qweight.size(0), K = qweight.size(1);
  at::Tensor pw = at::zeros({round_up(N, kPadN), round_up(K, kPadK)}, qweight.options());
  pw.narrow(0, 0, N).narrow(1, 0, K).copy_(qweight);
  at::Tensor colsum = qweight.sum(1, false, at::kInt);
  return {pw, colsum};
}

// x [..., K] float -> (q int8 [..., K], scales float32 [...], outlier_cols int64 [n]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_cuda(const at::Tensor& x, double threshold,
                                                                 const std::optional<at::Tensor>& act_scale) {
  const at::Device dev = cuda_device({&x, opt(act_scale)});
  check_device("quantize_act", "x", x, dev);
  check_capability("quantize_act", dev);
  HQ_CHECK(is_float(x.scalar_type()), "hfquant::quantize_act: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  HQ_CHECK(x.dim() >= 1, "hfquant::quantize_act: x must have at least one dimension");
  check_threshold("quantize_act", threshold);
  const int64_t K = x.size(-1);
  HQ_CHECK(K > 0, "hfquant::quantize_act: x has an empty last dimension");
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor as = act_scale ? float_vector("quantize_act", "act_scale", *act_scale, K, dev) : at::Tensor();
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto ss = x.sizes().vec();
  ss.pop_back();
  at::Tensor scales = at::empty(ss, x.options().dtype(at::kFloat));
  at::Tensor cols = quantize_into("quantize_act", x2, as, threshold, q.data_ptr<int8_t>(), K, scales.data_ptr<float>());
  return {q, scales, cols};
}

// Exact int32 xq [M, K] @ W^T -> [M, N].
at::Tensor int8_mm_cuda(const at::Tensor& xq, const at::Tensor& packed_weight, const at::Tensor& colsum,
                        int64_t out_features) {
  const at::Device dev = cuda_device({&xq, &packed_weight, &colsum});
  check_device("int8_mm", "xq", xq, dev);
  check_capability("int8_mm", dev);
  const WeightInfo w = check_weight("int8_mm", packed_weight, colsum, out_features, dev);
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor buf = pad_act("int8_mm", xq, w, dev);
  const int64_t M = xq.size(0);
  if (M == 0) return at::empty({0, w.N}, xq.options().dtype(at::kInt));
  return int_mm(buf, packed_weight).narrow(0, 0, M).narrow(1, 0, w.N).contiguous();
}

// y = (xq @ W^T) * x_scales[m] * w_scales[n] + bias[n], in out_dtype.
at::Tensor int8_gemm_cuda(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& packed_weight,
                          const at::Tensor& colsum, const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                          at::ScalarType out_dtype, int64_t out_features) {
  const at::Device dev = cuda_device({&xq, &x_scales, &packed_weight, &colsum, &w_scales, opt(bias)});
  check_device("int8_gemm", "xq", xq, dev);
  check_capability("int8_gemm", dev);
  const WeightInfo w = check_weight("int8_gemm", packed_weight, colsum, out_features, dev);
  HQ_CHECK(is_float(out_dtype), "hfquant::int8_gemm: out_dtype must be float32, bfloat16 or float16, got ",
              out_dtype);
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor buf = pad_act("int8_gemm", xq, w, dev);
  const int64_t M = xq.size(0), N = w.N;
  const at::Tensor xs = float_vector("int8_gemm", "x_scales", x_scales, M, dev);
  const at::Tensor ws = float_vector("int8_gemm", "w_scales", w_scales, N, dev);
  const at::Tensor b = bias ? float_vector("int8_gemm", "bias", *bias, N, dev) : at::Tensor();
  at::Tensor y = at::empty({M, N}, xq.options().dtype(out_dtype));
  if (M == 0) return y;
  const at::Tensor acc = int_mm(buf, packed_weight);
  run_epilogue(acc, xs, ws, at::Tensor(), b, M, N, y, "int8_gemm");
  return y;
}

// The linear layer of W8A8 (threshold 0) and LLM.int8() (threshold > 0): x [..., K] float
// -> y [..., N] in x.dtype (see the CPU op for the semantics).
at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& colsum,
                            const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& act_scale, double threshold, int64_t out_features) {
  const at::Device dev = cuda_device({&x, &packed_weight, &colsum, &w_scales, opt(bias), opt(act_scale)});
  check_device("int8_linear", "x", x, dev);
  check_capability("int8_linear", dev);
  const WeightInfo w = check_weight("int8_linear", packed_weight, colsum, out_features, dev);
  HQ_CHECK(is_float(x.scalar_type()), "hfquant::int8_linear: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  HQ_CHECK(x.dim() >= 1, "hfquant::int8_linear: x must have at least one dimension");
  check_threshold("int8_linear", threshold);
  const int64_t K = x.size(-1), N = w.N;
  HQ_CHECK(K <= w.Kp && K > w.Kp - kPadK, "hfquant::int8_linear: x has last dimension ", K,
              ", but packed_weight holds in_features in (", w.Kp - kPadK, ", ", w.Kp, "]");
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor ws = float_vector("int8_linear", "w_scales", w_scales, N, dev);
  const at::Tensor b = bias ? float_vector("int8_linear", "bias", *bias, N, dev) : at::Tensor();
  const at::Tensor as = act_scale ? float_vector("int8_linear", "act_scale", *act_scale, K, dev) : at::Tensor();
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  if (M == 0) return at::empty(out_sizes, x.options());

  const int64_t Mp = padded_rows(M);
  at::Tensor buf = at::empty({Mp, w.Kp}, x.options().dtype(at::kChar));
  if (Mp > M) buf.narrow(0, M, Mp - M).zero_();
  at::Tensor xs = at::empty({M}, x.options().dtype(at::kFloat));
  const at::Tensor cols = quantize_into("int8_linear", x2, as, threshold, buf.data_ptr<int8_t>(), w.Kp,
                                        xs.data_ptr<float>());
  const at::Tensor acc = int_mm(buf, packed_weight);
  // LLM.int8: the outlier columns of x * act_scale times the matching weight columns
  // (dequantized) in fp32, added in the epilogue.
  at::Tensor add;
  if (cols.numel()) {
    at::Tensor xo = x2.index_select(1, cols).to(at::kFloat);
    if (as.defined()) xo = xo * as.index_select(0, cols);
    const at::Tensor wo = packed_weight.narrow(0, 0, N).index_select(1, cols).to(at::kFloat) * ws.unsqueeze(1);
    add = at::mm(xo, wo.t());
  }
  at::Tensor y = at::empty({M, N}, x.options());
  run_epilogue(acc, xs, ws, add, b, M, N, y, "int8_linear");
  return y.reshape(out_sizes);
}

}  // namespace hfquant::cuda

TORCH_LIBRARY_IMPL(hfquant, CUDA, m) {
  m.impl("int8_pack", &hfquant::cuda::int8_pack_cuda);
  m.impl("quantize_act", &hfquant::cuda::quantize_act_cuda);
  m.impl("int8_mm", &hfquant::cuda::int8_mm_cuda);
  m.impl("int8_gemm", &hfquant::cuda::int8_gemm_cuda);
  m.impl("int8_linear", &hfquant::cuda::int8_linear_cuda);
}
