// Quantized KV cache ops on CUDA: the same format and numbers as csrc/cpu/kv_cache.cpp
// (keys per channel, values per token; fp16 scale/min; codes packed along D in planes,
// element d in byte d % R at bit (d / R) * bits, R = D * bits / 8).
//
// Every arithmetic step is an explicitly rounded fp32 operation (__fsub_rn, __fmul_rn,
// __fadd_rn, __fdiv_rn): no fused multiply-add, so codes and dequantized values equal the
// reference's bit for bit.
#include <ATen/ATen.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "cuda/common.cuh"

namespace hfquant::cuda {
namespace {

constexpr int kMaxD = 512;
constexpr int kTokChunk = 4;  // tokens per block for per-token (value) quantization

void check_scheme(const char* op, int64_t bits, int64_t group_size, int64_t D, int64_t T, bool per_channel) {
  HQ_CHECK(bits == 2 || bits == 4 || bits == 8, "hfquant::", op, ": bits=", bits, " is not supported (use 2, 4 or 8)");
  HQ_CHECK(group_size > 0, "hfquant::", op, ": group_size=", group_size, " must be positive");
  HQ_CHECK(D > 0 && (D * bits) % 8 == 0, "hfquant::", op, ": head_dim=", D, " does not pack into whole bytes at ",
              bits, " bits");
  if (per_channel) {
    HQ_CHECK(T % group_size == 0, "hfquant::", op, ": per-channel (key) quantization needs a whole number of ",
                group_size, "-token groups; got ", T, " tokens");
  } else {
    HQ_CHECK(D % group_size == 0, "hfquant::", op, ": group_size=", group_size,
                " does not divide head_dim=", D);
  }
  HQ_CHECK(D <= kMaxD, "hfquant::", op, ": head_dim=", D, " is larger than ", kMaxD);
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

struct Params {
  __half scale, min;
  float s, m, inv;  // stored values as float, 1 / s (0 for a constant or non-finite group)
  bool finite;
};

__device__ Params group_params(float lo, float hi, bool finite, int qmax) {
  Params p;
  p.finite = finite;
  if (!finite) {
    p.scale = p.min = __float2half_rn(NAN);
    p.inv = 0.f;
  } else {
    p.scale = __float2half_rn(__fdiv_rn(__fsub_rn(hi, lo), float(qmax)));
    p.min = __float2half_rn(lo);
    const float s = __half2float(p.scale);
    p.inv = s > 0.f ? __fdiv_rn(1.f, s) : 0.f;
  }
  p.s = __half2float(p.scale);
  p.m = __half2float(p.min);
  return p;
}

__device__ __forceinline__ int code_of(float x, float mn, float inv, int qmax) {
  const float c = rintf(__fmul_rn(__fsub_rn(x, mn), inv));  // round half to even
  return int(fminf(float(qmax), fmaxf(0.f, c)));
}

// One block per (head, chunk): chunk = one g-token group (per channel) or kTokChunk tokens
// (per token). Phase 1: the chunk's group parameters (to the stores and shared memory);
// phase 2: one thread per output byte gathers its 8 / bits codes (no read-modify-write).
// x [BH, t, D] contiguous; stores [BH, Tcap, R], params [BH, prows, G]; tokens at `at`.
template <typename X>
__global__ void kv_quantize_kernel(const X* __restrict__ x, int64_t t, int D, int bits, int g, bool per_channel,
                                   uint8_t* __restrict__ codes, __half* __restrict__ scales, __half* __restrict__ mins,
                                   int64_t Tcap, int64_t prows, int64_t at, int64_t chunks) {
  __shared__ float sh_m[kMaxD * kTokChunk], sh_inv[kMaxD * kTokChunk];
  __shared__ unsigned char sh_ok[kMaxD * kTokChunk];
  const int64_t bh = blockIdx.x / chunks, ci = blockIdx.x % chunks;
  const int qmax = (1 << bits) - 1, R = D * bits / 8, per = 8 / bits;
  const int64_t tok0 = per_channel ? ci * g : ci * kTokChunk;
  const int ntok = per_channel ? g : int(t - tok0 < kTokChunk ? t - tok0 : kTokChunk);
  const X* xb = x + (bh * t + tok0) * D;
  const int G = per_channel ? D : D / g;
  const int ngroups = per_channel ? D : ntok * G;
  for (int i = threadIdx.x; i < ngroups; i += blockDim.x) {
    float lo = INFINITY, hi = -INFINITY;
    bool finite = true;
    int64_t prow;
    int col;
    if (per_channel) {
      for (int tt = 0; tt < g; ++tt) {
        const float v = float(xb[int64_t(tt) * D + i]);
        finite = finite && isfinite(v);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
      }
      prow = (at + tok0) / g;
      col = i;
    } else {
      const int tt = i / G, j = i % G;
      for (int e = 0; e < g; ++e) {
        const float v = float(xb[int64_t(tt) * D + j * g + e]);
        finite = finite && isfinite(v);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
      }
      prow = at + tok0 + tt;
      col = j;
    }
    const Params p = group_params(lo, hi, finite, qmax);
    scales[(bh * prows + prow) * G + col] = p.scale;
    mins[(bh * prows + prow) * G + col] = p.min;
    sh_m[i] = p.m;
    sh_inv[i] = p.inv;
    sh_ok[i] = finite;
  }
  __syncthreads();
  const int nbytes = ntok * R;
  for (int i = threadIdx.x; i < nbytes; i += blockDim.x) {
    const int tt = i / R, b = i % R;
    unsigned v = 0;
    for (int pl = 0; pl < per; ++pl) {
      const int d = b + R * pl;
      const int gi = per_channel ? d : tt * G + d / g;
      int c = 0;
      if (sh_ok[gi]) c = code_of(float(xb[int64_t(tt) * D + d]), sh_m[gi], sh_inv[gi], qmax);
      v |= unsigned(c) << (pl * bits);
    }
    codes[(bh * Tcap + at + tok0 + tt) * R + b] = uint8_t(v);
  }
}

// y[bh, tok, d] = c * s + m for tokens [0, length); one thread per output element.
template <typename Y>
__global__ void kv_dequantize_kernel(const uint8_t* __restrict__ codes, const __half* __restrict__ scales,
                                     const __half* __restrict__ mins, int64_t BH, int64_t Tcap, int64_t prows,
                                     int64_t length, int D, int bits, int g, bool per_channel, Y* __restrict__ y,
                                     int64_t ty) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= BH * length * D) return;
  const int d = int(i % D);
  const int64_t tok = (i / D) % length, bh = i / (int64_t(D) * length);
  const int R = D * bits / 8;
  const int c = (codes[(bh * Tcap + tok) * R + d % R] >> ((d / R) * bits)) & ((1 << bits) - 1);
  const int G = per_channel ? D : D / g;
  const int64_t prow = per_channel ? tok / g : tok;
  const int col = per_channel ? d : d / g;
  const int64_t pi = (bh * prows + prow) * G + col;
  const float v = __fadd_rn(__fmul_rn(float(c), __half2float(scales[pi])), __half2float(mins[pi]));
  y[(bh * ty + tok) * D + d] = Y(v);
}

struct Stores {
  int64_t BH, T, D, R, prows, G;
};

Stores check_stores(const char* op, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                    int64_t bits, int64_t group_size, bool per_channel) {
  const at::Device dev = cuda_device({&codes, &scales, &mins});
  check_device(op, "codes", codes, dev);
  check_device(op, "scales", scales, dev);
  check_device(op, "mins", mins, dev);
  HQ_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() >= 2, "hfquant::", op,
              ": codes must be a contiguous uint8 tensor [..., T, D*bits/8], got ", codes.scalar_type(), " ",
              codes.sizes());
  HQ_CHECK(bits == 2 || bits == 4 || bits == 8, "hfquant::", op, ": bits=", bits, " is not supported (use 2, 4 or 8)");
  const int64_t T = codes.size(-2), D = codes.size(-1) * 8 / bits;
  check_scheme(op, bits, group_size, D, T, per_channel);
  auto want = codes.sizes().vec();
  want[want.size() - 2] = per_channel ? T / group_size : T;
  want.back() = per_channel ? D : D / group_size;
  for (const auto* t : {&scales, &mins}) {
    HQ_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->sizes().vec() == want, "hfquant::", op,
                ": scales and mins must be contiguous float16 ", c10::IntArrayRef(want), ", got ", t->scalar_type(),
                " ", t->sizes());
  }
  const int64_t BH = codes.numel() / std::max<int64_t>(1, T * codes.size(-1));
  return {BH, T, D, codes.size(-1), want[want.size() - 2], want.back()};
}

void launch_quantize(const char* op, const at::Tensor& xc, int64_t BH, int64_t t, int64_t D, int64_t bits,
                     int64_t g, bool per_channel, at::Tensor& codes, at::Tensor& scales, at::Tensor& mins,
                     int64_t Tcap, int64_t prows, int64_t at_tok) {
  if (BH == 0 || t == 0) return;
  const int64_t chunks = per_channel ? t / g : ceil_div(t, kTokChunk);
  HQ_CHECK(!per_channel || g <= 1 << 20, "hfquant::", op, ": group_size too large");
  dispatch_float(xc.scalar_type(), op, "states", [&](auto* tag) {
    using X = std::remove_pointer_t<decltype(tag)>;
    kv_quantize_kernel<X><<<unsigned(BH * chunks), 128, 0, stream()>>>(
        xc.data_ptr<X>(), t, int(D), int(bits), int(g), per_channel, codes.data_ptr<uint8_t>(),
        reinterpret_cast<__half*>(scales.data_ptr<at::Half>()), reinterpret_cast<__half*>(mins.data_ptr<at::Half>()),
        Tcap, prows, at_tok, chunks);
  });
  HFQUANT_CUDA_CHECK_LAUNCH();
}

void dequantize_into(const char* op, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                     const at::Tensor& y, int64_t length, int64_t bits, int64_t group_size, bool per_channel) {
  const Stores s = check_stores(op, codes, scales, mins, bits, group_size, per_channel);
  check_capability(op, codes.device());
  HQ_CHECK(length >= 0 && length <= s.T, "hfquant::", op, ": length=", length, " is outside the stores' ", s.T,
              " tokens");
  check_device(op, "out", y, codes.device());
  HQ_CHECK(y.is_contiguous() && y.dim() == codes.dim() && y.size(-1) == s.D && y.size(-2) >= length,
              "hfquant::", op, ": out must be a contiguous CUDA tensor [..., >= ", length, ", ", s.D, "], got ",
              y.sizes());
  for (int64_t i = 0; i + 2 < y.dim(); ++i)
    HQ_CHECK(y.size(i) == codes.size(i), "hfquant::", op, ": out has shape ", y.sizes(), ", the stores ",
                codes.sizes());
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t total = s.BH * length * s.D;
  if (total == 0) return;
  const int64_t ty = y.size(-2);
  dispatch_float(y.scalar_type(), op, "out", [&](auto* tag) {
    using Y = std::remove_pointer_t<decltype(tag)>;
    kv_dequantize_kernel<Y><<<unsigned(ceil_div(total, 256)), 256, 0, stream()>>>(
        codes.data_ptr<uint8_t>(), reinterpret_cast<const __half*>(scales.data_ptr<at::Half>()),
        reinterpret_cast<const __half*>(mins.data_ptr<at::Half>()), s.BH, s.T, s.prows, length, int(s.D), int(bits),
        int(group_size), per_channel, y.data_ptr<Y>(), ty);
  });
  HFQUANT_CUDA_CHECK_LAUNCH();
}

}  // namespace

// x [..., T, D] -> (codes uint8 [..., T, D*bits/8], scales fp16, mins fp16).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_quantize_cuda(const at::Tensor& x, int64_t bits, int64_t group_size,
                                                                bool per_channel) {
  HQ_CHECK(x.is_cuda(), "hfquant::kv_quantize: x is on ", x.device(), ", expected a CUDA device");
  check_capability("kv_quantize", x.device());
  HQ_CHECK(x.dim() >= 2, "hfquant::kv_quantize: x must be [..., tokens, head_dim], got ", x.dim(), "-D");
  const int64_t T = x.size(-2), D = x.size(-1);
  check_scheme("kv_quantize", bits, group_size, D, T, per_channel);
  HQ_CHECK(is_float(x.scalar_type()), "hfquant::kv_quantize: states must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  auto cs = x.sizes().vec();
  cs.back() = D * bits / 8;
  auto ps = x.sizes().vec();
  ps[ps.size() - 2] = per_channel ? T / group_size : T;
  ps.back() = per_channel ? D : D / group_size;
  at::Tensor codes = at::empty(cs, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty(ps, x.options().dtype(at::kHalf));
  at::Tensor mins = at::empty(ps, x.options().dtype(at::kHalf));
  const at::Tensor xc = x.contiguous();
  const int64_t BH = T * D ? xc.numel() / (T * D) : 0;
  launch_quantize("kv_quantize", xc, BH, T, D, bits, group_size, per_channel, codes, scales, mins, T, ps[ps.size() - 2],
                  0);
  return {codes, scales, mins};
}

// Quantizes x [..., t, D] into the stores (capacity T tokens) at token `offset`, in place.
void kv_append_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                    int64_t offset, int64_t bits, int64_t group_size, bool per_channel) {
  const Stores s = check_stores("kv_append", codes, scales, mins, bits, group_size, per_channel);
  check_device("kv_append", "x", x, codes.device());
  check_capability("kv_append", codes.device());
  HQ_CHECK(x.dim() == codes.dim(), "hfquant::kv_append: x must be a CUDA tensor [..., t, D] with the stores' "
              "leading dimensions");
  HQ_CHECK(is_float(x.scalar_type()), "hfquant::kv_append: states must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  const int64_t t = x.size(-2);
  for (int64_t i = 0; i + 2 < x.dim(); ++i)
    HQ_CHECK(x.size(i) == codes.size(i), "hfquant::kv_append: x has shape ", x.sizes(), ", the stores ",
                codes.sizes());
  HQ_CHECK(x.size(-1) == s.D, "hfquant::kv_append: x has head_dim ", x.size(-1), ", the stores ", s.D);
  HQ_CHECK(offset >= 0 && offset + t <= s.T, "hfquant::kv_append: tokens [", offset, ", ", offset + t,
              ") do not fit the stores' capacity of ", s.T);
  if (per_channel)
    HQ_CHECK(offset % group_size == 0 && t % group_size == 0, "hfquant::kv_append: per-channel (key) blocks "
                "must start and end on ", group_size, "-token boundaries (offset ", offset, ", ", t, " tokens)");
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor c = codes, sc = scales, mn = mins;
  launch_quantize("kv_append", xc, s.BH, t, s.D, bits, group_size, per_channel, c, sc, mn, s.T, s.prows, offset);
}

at::Tensor kv_dequantize_cuda(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins, int64_t length,
                              int64_t bits, int64_t group_size, bool per_channel, at::ScalarType dtype) {
  HQ_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hfquant::kv_dequantize: dtype must be float32, bfloat16 or float16, got ", dtype);
  HQ_CHECK(codes.dim() >= 2, "hfquant::kv_dequantize: codes must be [..., T, D*bits/8], got ", codes.sizes());
  HQ_CHECK(bits == 2 || bits == 4 || bits == 8, "hfquant::kv_dequantize: bits=", bits,
              " is not supported (use 2, 4 or 8)");
  auto sz = codes.sizes().vec();
  sz[sz.size() - 2] = std::max<int64_t>(0, std::min<int64_t>(length, codes.size(-2)));
  sz.back() = codes.size(-1) * 8 / bits;
  at::Tensor y = at::empty(sz, codes.options().dtype(dtype));
  dequantize_into("kv_dequantize", codes, scales, mins, y, length, bits, group_size, per_channel);
  return y;
}

void kv_dequantize_into_cuda(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                             const at::Tensor& out, int64_t length, int64_t bits, int64_t group_size,
                             bool per_channel) {
  dequantize_into("kv_dequantize_into", codes, scales, mins, out, length, bits, group_size, per_channel);
}

}  // namespace hfquant::cuda

TORCH_LIBRARY_IMPL(hfquant, CUDA, m) {
  m.impl("kv_quantize", &hfquant::cuda::kv_quantize_cuda);
  m.impl("kv_append", &hfquant::cuda::kv_append_cuda);
  m.impl("kv_dequantize", &hfquant::cuda::kv_dequantize_cuda);
  m.impl("kv_dequantize_into", &hfquant::cuda::kv_dequantize_into_cuda);
}
