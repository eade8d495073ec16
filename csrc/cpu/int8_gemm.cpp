// The int8-activation ops on CPU: weight packing, dynamic per-row activation quantization
// with LLM.int8() outlier columns, the int8 GEMM (raw int32 or scaled), and the fused
// linear layer of W8A8 / LLM.int8(). Argument checks and the choice of kernel path are
// here; the kernels are in int8_gemm_{avx512,avx2,portable}.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/aten_util.h"
#include "cpu/cpu_features.h"
#include "cpu/int8_gemm.h"

namespace hfquant::cpu {
namespace {

using i8::kKG;
using i8::kTile;

// -1: follow the active ISA; else a forced i8::Path (set_int8_path).
std::atomic<int> g_forced_path{-1};

bool can_run(i8::Path p) {
  const Features& f = features();
  switch (p) {
    case i8::Path::Vnni512: return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512_vnni;
    case i8::Path::AvxVnni: return f.avx2 && f.fma && f.f16c && f.avx_vnni;
    case i8::Path::Avx2: return f.avx2 && f.fma && f.f16c;
    default: return true;
  }
}

// The fastest integer dot product under the active ISA: AVX-512 VNNI, AVX-VNNI (VEX
// vpdpbusd on 256 bits), AVX2 (vpmaddubsw), portable C++.
i8::Path int8_path() {
  const int forced = g_forced_path.load(std::memory_order_relaxed);
  if (forced >= 0) return i8::Path(forced);
  const Isa isa = active_isa();
  if ((isa == Isa::Avx512 || isa == Isa::Avx512Bf16) && can_run(i8::Path::Vnni512)) return i8::Path::Vnni512;
  if (isa == Isa::Portable) return i8::Path::Portable;
  return can_run(i8::Path::AvxVnni) ? i8::Path::AvxVnni : i8::Path::Avx2;
}

const char* path_name(i8::Path p) {
  switch (p) {
    case i8::Path::Vnni512: return "avx512vnni";
    case i8::Path::AvxVnni: return "avxvnni";
    case i8::Path::Avx2: return "avx2";
    default: return "portable";
  }
}

i8::GemmFn gemm_fn(i8::Path p) {
  switch (p) {
#if defined(HFQUANT_X86)
    case i8::Path::Vnni512: return i8::gemm_vnni512;
    case i8::Path::AvxVnni: return i8::gemm_avxvnni;
    case i8::Path::Avx2: return i8::gemm_avx2;
#endif
    default: return i8::gemm_portable;
  }
}

void check_cpu(const char* op, const char* what, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "hfquant::", op, ": ", what, " is on ", t.device(),
              " but this is the CPU kernel (is the CUDA extension built?)");
}

// Checks the packed weight and column sums against out_features; returns the view.
i8::WeightView weight_view(const char* op, const at::Tensor& pw, const at::Tensor& colsum, int64_t N) {
  check_cpu(op, "packed_weight", pw);
  check_cpu(op, "colsum", colsum);
  TORCH_CHECK(N > 0, "hfquant::", op, ": out_features=", N, " must be positive");
  TORCH_CHECK(pw.scalar_type() == at::kChar && pw.is_contiguous() && pw.dim() == 4 && pw.size(2) == kTile &&
                  pw.size(3) == kKG,
              "hfquant::", op, ": packed_weight must be a contiguous int8 tensor [Nt, K/4, 16, 4] from "
              "hfquant::int8_pack, got ", pw.scalar_type(), " ", pw.sizes());
  const int64_t Nt = (N + kTile - 1) / kTile;
  TORCH_CHECK(pw.size(0) == Nt, "hfquant::", op, ": packed_weight has ", pw.size(0), " tiles, expected ", Nt,
              " for out_features=", N);
  TORCH_CHECK(pw.size(1) > 0, "hfquant::", op, ": packed_weight has no columns");
  TORCH_CHECK(colsum.scalar_type() == at::kInt && colsum.is_contiguous() && colsum.dim() == 1 &&
                  colsum.size(0) == N,
              "hfquant::", op, ": colsum must be a contiguous int32 tensor [", N, "] from hfquant::int8_pack, got ",
              colsum.scalar_type(), " ", colsum.sizes());
  return {pw.data_ptr<int8_t>(), colsum.data_ptr<int32_t>(), N, pw.size(1) * kKG, pw.size(1), Nt};
}

at::Tensor float_vector(const char* op, const char* what, const at::Tensor& t, int64_t n) {
  check_cpu(op, what, t);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "hfquant::", op, ": ", what, " has shape ", t.sizes(), ", expected [",
              n, "]");
  TORCH_CHECK(t.is_floating_point(), "hfquant::", op, ": ", what, " must be floating point, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// Runs the GEMM over all rows and tiles. Tasks split the tiles; each task passes all rows
// over its tiles (their weights stay in cache while the rows stream by).
void run_gemm(i8::Path path, const i8::ActView& a, const i8::WeightView& w, const i8::Epilogue& e) {
  const i8::GemmFn fn = gemm_fn(path);
  // At least ~256K multiply-adds per task: small layers at decode run on one thread.
  const int64_t per_tile = kTile * w.K4 * kKG * std::max<int64_t>(1, a.M);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / per_tile);
  at::parallel_for(0, w.Nt, grain, [&](int64_t t0, int64_t t1) { fn(a, w, e, 0, a.M, t0, t1); });
}

const i8::RowFns& row_fns(i8::Path path) {
  switch (path) {
#if defined(HFQUANT_X86)
    case i8::Path::Vnni512: return i8::kRowsAvx512;
    case i8::Path::AvxVnni:
    case i8::Path::Avx2: return i8::kRowsAvx2;
#endif
    default: return i8::kRowsPortable;
  }
}

// Activations as float32 rows multiplied by act_scale (when given): x itself when it is
// already float32 with unit column stride and nothing to multiply, else a converted copy.
struct FloatRows {
  at::Tensor holder;
  const float* p;
  int64_t ld;
};

FloatRows float_rows(const at::Tensor& x2d, const float* act_scale) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  if (x2d.scalar_type() == at::kFloat && !act_scale && x2d.stride(1) == 1)
    return {at::Tensor(), x2d.data_ptr<float>(), x2d.stride(0)};
  at::Tensor buf = at::empty({M, K}, x2d.options().dtype(at::kFloat));
  float* dst = buf.data_ptr<float>();
  dispatch_float(x2d.scalar_type(), "int8 activation quantization", "x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* src = reinterpret_cast<const T*>(x2d.data_ptr());
    const int64_t ld = x2d.stride(0), cs = x2d.stride(1);
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const T* xr = src + m * ld;
        float* d = dst + m * K;
        if (act_scale) {
          for (int64_t k = 0; k < K; ++k) d[k] = float(xr[k * cs]) * act_scale[k];
        } else {
          for (int64_t k = 0; k < K; ++k) d[k] = float(xr[k * cs]);
        }
      }
    });
  });
  return {buf, dst, K};
}

// Outlier columns (threshold > 0): any row with !(|x| < threshold), NaN and Inf included,
// so that those take the floating-point path and propagate as IEEE says. Sets mask[k].
std::vector<int64_t> find_outliers(const i8::RowFns& fns, const FloatRows& x, int64_t M, int64_t K,
                                   float threshold, std::vector<uint8_t>& mask) {
  std::vector<std::vector<uint8_t>> per_thread(at::get_num_threads());
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    std::vector<uint8_t>& mk = per_thread[at::get_thread_num()];
    if (mk.empty()) mk.assign(K, 0);
    for (int64_t m = m0; m < m1; ++m) fns.flag(x.p + m * x.ld, K, threshold, mk.data());
  });
  mask.assign(K, 0);
  for (const auto& mk : per_thread)
    for (int64_t k = 0; k < int64_t(mk.size()); ++k) mask[k] |= mk[k];
  std::vector<int64_t> cols;
  for (int64_t k = 0; k < K; ++k)
    if (mask[k]) cols.push_back(k);
  return cols;
}

// Per-row (per-token) absmax quantization. Columns flagged in `outlier` are left out of
// the absmax and quantized to 0. Per row: absmax a over the kept columns; a NaN/Inf among
// them -> scale NaN and codes 0 (the row's output becomes NaN); a = 0 (or so small that
// 127 / a overflows) -> scale 0 and codes 0; otherwise scale = a / 127 and
// q = clamp(round_half_even(x * (127 / a)), -127, 127). Writes the codes into q (row
// stride ldq) with `offset` added (0, or 128 for the VNNI path's unsigned bytes), and
// pads columns [K, ldq) with `offset`.
void quantize_rows(const i8::RowFns& fns, const FloatRows& x, int64_t M, int64_t K, const uint8_t* outlier,
                   uint8_t* q, int64_t ldq, uint8_t offset, float* scales) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = x.p + m * x.ld;
      uint8_t* qr = q + m * ldq;
      const float amax = fns.absmax(row, K, outlier);
      const float inv = 127.f / amax;
      if (std::isnan(amax) || amax == 0.f || !std::isfinite(inv)) {
        scales[m] = std::isnan(amax) ? amax : 0.f;
        std::memset(qr, offset, ldq);
        continue;
      }
      scales[m] = amax / 127.f;
      fns.quant(row, K, outlier, inv, qr, offset);
      std::memset(qr + K, offset, ldq - K);
    }
  });
}

void check_threshold(const char* op, double threshold) {
  TORCH_CHECK(!std::isnan(threshold) && threshold >= 0, "hfquant::", op, ": threshold=", threshold,
              " must be >= 0 (0 turns outlier detection off, inf keeps only non-finite values apart)");
}

void check_x(const char* op, const at::Tensor& x, int64_t K) {
  check_cpu(op, "x", x);
  TORCH_CHECK(is_float(x.scalar_type()), "hfquant::", op, ": x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && (K < 0 || x.size(-1) == K), "hfquant::", op, ": x has last dimension ",
              x.dim() ? x.size(-1) : 0, ", expected in_features=", K);
}

// Quantized activations in the layout of the active kernel path.
struct QuantizedAct {
  at::Tensor buf;     // uint8 [M, K4*4]
  at::Tensor scales;  // float32 [M]
  std::vector<int64_t> outliers;
  FloatRows xf;       // the float rows that were quantized (x * act_scale)
};

QuantizedAct quantize_for_gemm(i8::Path path, const at::Tensor& x2d, const at::Tensor& act_scale, double threshold,
                               int64_t K4) {
  const i8::RowFns& fns = row_fns(path);
  const int64_t M = x2d.size(0), K = x2d.size(1);
  QuantizedAct r;
  r.buf = at::empty({M, K4 * kKG}, x2d.options().dtype(at::kByte));
  r.scales = at::empty({M}, x2d.options().dtype(at::kFloat));
  r.xf = float_rows(x2d, act_scale.defined() ? act_scale.data_ptr<float>() : nullptr);
  std::vector<uint8_t> mask;
  if (threshold > 0) r.outliers = find_outliers(fns, r.xf, M, K, float(threshold), mask);
  quantize_rows(fns, r.xf, M, K, r.outliers.empty() ? nullptr : mask.data(), r.buf.data_ptr<uint8_t>(), K4 * kKG,
                i8::offset_activations(path) ? 128 : 0, r.scales.data_ptr<float>());
  return r;
}

// The outlier part of LLM.int8 in float32: x[m][c_i] (already times act_scale) and the
// weight columns c_i dequantized from the packed int8 layout, wo[i][n] = w[n][c_i] * ws[n].
struct OutlierPart {
  at::Tensor xo, wo;  // [M, n_out], [n_out, N]
  at::Tensor add;     // [M, N] = xo @ wo, precomputed when there are many outliers
};

// Up to this many outlier columns the epilogue multiplies them in (n_out vector FMAs per
// 16 outputs); more go through ATen's GEMM first.
constexpr int64_t kFusedOutliers = 32;

OutlierPart outlier_part(const QuantizedAct& qa, int64_t M, const i8::WeightView& w, const float* ws,
                         const at::TensorOptions& opts) {
  const std::vector<int64_t>& cols = qa.outliers;
  const int64_t n_out = int64_t(cols.size()), N = w.N;
  OutlierPart r;
  r.xo = at::empty({M, n_out}, opts.dtype(at::kFloat));
  r.wo = at::empty({n_out, N}, opts.dtype(at::kFloat));
  float* xop = r.xo.data_ptr<float>();
  float* wop = r.wo.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < n_out; ++i) xop[m * n_out + i] = qa.xf.p[m * qa.xf.ld + cols[i]];
  // Per tile, the 16 channels' weights of one column share a cache line; the lines of
  // tiles a few ahead are prefetched (the weights are usually cold here).
  constexpr int64_t kAhead = 8;
  auto line = [&](int64_t t, int64_t k) { return w.w + t * w.K4 * 64 + (k / kKG) * kTile * kKG + k % kKG; };
  at::parallel_for(0, w.Nt, std::max<int64_t>(1, 256 / n_out), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t + kAhead < t1)
        for (int64_t i = 0; i < n_out; ++i) __builtin_prefetch(line(t + kAhead, cols[i]));
      const int64_t nv = std::min<int64_t>(kTile, N - t * kTile);
      for (int64_t i = 0; i < n_out; ++i) {
        const int8_t* src = line(t, cols[i]);
        float* dst = wop + i * N + t * kTile;
        for (int64_t c = 0; c < nv; ++c) dst[c] = float(src[c * kKG]) * ws[t * kTile + c];
      }
    }
  });
  if (n_out > kFusedOutliers) r.add = at::mm(r.xo, r.wo);
  return r;
}

}  // namespace

// qweight int8 [N, K] (values in [-127, 127] or -128) -> (packed int8 [Nt, K4, 16, 4],
// colsum int32 [N]).
std::tuple<at::Tensor, at::Tensor> int8_pack_cpu(const at::Tensor& qweight) {
  check_cpu("int8_pack", "qweight", qweight);
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "hfquant::int8_pack: qweight must be int8, got ",
              qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) > 0 && qweight.size(1) > 0,
              "hfquant::int8_pack: qweight must be a non-empty 2-D [out_features, in_features] tensor, got ",
              qweight.sizes());
  const int64_t N = qweight.size(0), K = qweight.size(1);
  const int64_t Nt = (N + kTile - 1) / kTile, K4 = (K + kKG - 1) / kKG;
  const at::Tensor q = qweight.contiguous();
  at::Tensor pw = at::zeros({Nt, K4, kTile, kKG}, q.options());
  at::Tensor colsum = at::empty({N}, q.options().dtype(at::kInt));
  const int8_t* src = q.data_ptr<int8_t>();
  int8_t* dst = pw.data_ptr<int8_t>();
  int32_t* cs = colsum.data_ptr<int32_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t t = n / kTile, c = n % kTile;
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int8_t v = src[n * K + k];
        dst[((t * K4 + k / kKG) * kTile + c) * kKG + k % kKG] = v;
        s += v;
      }
      cs[n] = s;
    }
  });
  return {pw, colsum};
}

// x [..., K] float -> (q int8 [..., K], scales float32 [...], outlier_cols int64 [n]).
// threshold > 0: columns holding any |x * act_scale| >= threshold (or a non-finite value)
// are outliers, listed in ascending order and quantized to 0 in every row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_cpu(const at::Tensor& x, double threshold,
                                                                const std::optional<at::Tensor>& act_scale) {
  check_x("quantize_act", x, -1);
  check_threshold("quantize_act", threshold);
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > 0, "hfquant::quantize_act: x has an empty last dimension");
  at::Tensor as = act_scale ? float_vector("quantize_act", "act_scale", *act_scale, K) : at::Tensor();
  const at::Tensor x2d = x.reshape({-1, K}).contiguous();
  const int64_t M = x2d.size(0);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto scale_sizes = x.sizes().vec();
  scale_sizes.pop_back();
  at::Tensor scales = at::empty(scale_sizes, x.options().dtype(at::kFloat));
  std::vector<int64_t> cols;
  if (M > 0) {
    const FloatRows xf = float_rows(x2d, as.defined() ? as.data_ptr<float>() : nullptr);
    std::vector<uint8_t> mask;
    const i8::RowFns& fns = row_fns(int8_path());
    if (threshold > 0) cols = find_outliers(fns, xf, M, K, float(threshold), mask);
    quantize_rows(fns, xf, M, K, cols.empty() ? nullptr : mask.data(), reinterpret_cast<uint8_t*>(q.data_ptr<int8_t>()),
                  K, 0, scales.data_ptr<float>());
  }
  at::Tensor out_cols = at::empty({int64_t(cols.size())}, x.options().dtype(at::kLong));
  std::copy(cols.begin(), cols.end(), out_cols.data_ptr<int64_t>());
  return {q, scales, out_cols};
}

namespace {

// int8 activations [M, K] from the user -> the kernel's row layout.
at::Tensor act_rows(const char* op, const at::Tensor& xq, const i8::WeightView& w, bool offset) {
  check_cpu(op, "xq", xq);
  TORCH_CHECK(xq.scalar_type() == at::kChar, "hfquant::", op, ": xq must be int8, got ", xq.scalar_type());
  TORCH_CHECK(xq.dim() == 2, "hfquant::", op, ": xq must be 2-D [M, K], got ", xq.dim(), "-D");
  const int64_t M = xq.size(0), K = xq.size(1);
  TORCH_CHECK(K <= w.K4 * kKG && K > w.K4 * kKG - kKG, "hfquant::", op, ": xq has ", K,
              " columns, but packed_weight holds in_features in (", w.K4 * kKG - kKG, ", ", w.K4 * kKG, "]");
  at::Tensor buf = at::empty({M, w.K4 * kKG}, xq.options().dtype(at::kByte));
  const int8_t* src = xq.data_ptr<int8_t>();
  uint8_t* dst = buf.data_ptr<uint8_t>();
  const uint8_t off = offset ? 128 : 0;
  bool has_min = false;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* s = src + m * xq.stride(0);
    uint8_t* d = dst + m * w.K4 * kKG;
    for (int64_t k = 0; k < K; ++k) {
      const int8_t v = s[k * xq.stride(1)];
      has_min |= v == -128;
      d[k] = uint8_t(v) + off;
    }
    std::memset(d + K, off, w.K4 * kKG - K);
  }
  TORCH_CHECK(!has_min, "hfquant::", op, ": xq holds -128; int8 activations must lie in [-127, 127] "
              "(symmetric quantization, as hfquant::quantize_act produces)");
  return buf;
}

}  // namespace

// Exact int32 product xq [M, K] @ W^T -> [M, N].
at::Tensor int8_mm_cpu(const at::Tensor& xq, const at::Tensor& packed_weight, const at::Tensor& colsum,
                       int64_t out_features) {
  const i8::WeightView w = weight_view("int8_mm", packed_weight, colsum, out_features);
  const i8::Path path = int8_path();  // once per call: the layout and the kernel must agree
  const at::Tensor buf = act_rows("int8_mm", xq, w, i8::offset_activations(path));
  const int64_t M = xq.size(0);
  at::Tensor y = at::empty({M, out_features}, xq.options().dtype(at::kInt));
  if (M == 0) return y;
  const i8::ActView a{buf.data_ptr<uint8_t>(), w.K4 * kKG, M};
  const i8::Epilogue e{y.data_ptr(), true, DType::F32, out_features, nullptr, nullptr, nullptr};
  run_gemm(path, a, w, e);
  return y;
}

// y = (xq @ W^T) * x_scales[m] * w_scales[n] + bias[n], in out_dtype.
at::Tensor int8_gemm_cpu(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& packed_weight,
                         const at::Tensor& colsum, const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                         at::ScalarType out_dtype, int64_t out_features) {
  const i8::WeightView w = weight_view("int8_gemm", packed_weight, colsum, out_features);
  TORCH_CHECK(is_float(out_dtype), "hfquant::int8_gemm: out_dtype must be float32, bfloat16 or float16, got ",
              out_dtype);
  const i8::Path path = int8_path();  // once per call: the layout and the kernel must agree
  const at::Tensor buf = act_rows("int8_gemm", xq, w, i8::offset_activations(path));
  const int64_t M = xq.size(0);
  const at::Tensor xs = float_vector("int8_gemm", "x_scales", x_scales, M);
  const at::Tensor ws = float_vector("int8_gemm", "w_scales", w_scales, out_features);
  const at::Tensor b = bias ? float_vector("int8_gemm", "bias", *bias, out_features) : at::Tensor();
  at::Tensor y = at::empty({M, out_features}, xq.options().dtype(out_dtype));
  if (M == 0) return y;
  const i8::ActView a{buf.data_ptr<uint8_t>(), w.K4 * kKG, M};
  const i8::Epilogue e{y.data_ptr(), false, dtype_of(out_dtype), out_features, xs.data_ptr<float>(),
                       ws.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr};
  run_gemm(path, a, w, e);
  return y;
}

// The linear layer of W8A8 (threshold 0) and LLM.int8() (threshold > 0):
// x [..., K] float -> y [..., N] in x.dtype. x is multiplied by act_scale (the inverse
// SmoothQuant factors) when given, quantized per row, multiplied with the int8 weights;
// outlier columns (threshold > 0) are multiplied in fp32 with the matching weight columns
// dequantized on the fly, and added.
at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& colsum,
                           const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& act_scale, double threshold, int64_t out_features) {
  const i8::WeightView w = weight_view("int8_linear", packed_weight, colsum, out_features);
  check_x("int8_linear", x, -1);
  check_threshold("int8_linear", threshold);
  const int64_t K = x.size(-1), N = out_features;
  TORCH_CHECK(K <= w.K4 * kKG && K > w.K4 * kKG - kKG, "hfquant::int8_linear: x has last dimension ", K,
              ", but packed_weight holds in_features in (", w.K4 * kKG - kKG, ", ", w.K4 * kKG, "]");
  const at::Tensor ws = float_vector("int8_linear", "w_scales", w_scales, N);
  const at::Tensor b = bias ? float_vector("int8_linear", "bias", *bias, N) : at::Tensor();
  const at::Tensor as = act_scale ? float_vector("int8_linear", "act_scale", *act_scale, K) : at::Tensor();
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  const at::Tensor x2d = x.reshape({-1, K});
  const at::Tensor xc = x2d.stride(1) == 1 ? x2d : x2d.contiguous();
  const int64_t M = xc.size(0);
  if (M == 0) return at::empty(out_sizes, x.options());

  const i8::Path path = int8_path();  // once per call: the layout and the kernel must agree
  QuantizedAct qa = quantize_for_gemm(path, xc, as, threshold, w.K4);
  const i8::ActView a{qa.buf.data_ptr<uint8_t>(), w.K4 * kKG, M};
  // LLM.int8: the outlier columns' product, in fp32, is added in the GEMM's epilogue.
  OutlierPart op;
  if (!qa.outliers.empty()) op = outlier_part(qa, M, w, ws.data_ptr<float>(), x.options());
  const bool fused = !qa.outliers.empty() && !op.add.defined();
  at::Tensor y = at::empty({M, N}, x.options());
  const i8::Epilogue e{y.data_ptr(), false, dtype_of(x.scalar_type()), N, qa.scales.data_ptr<float>(),
                       ws.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
                       op.add.defined() ? op.add.data_ptr<float>() : nullptr,
                       fused ? op.xo.data_ptr<float>() : nullptr, fused ? op.wo.data_ptr<float>() : nullptr,
                       fused ? int64_t(qa.outliers.size()) : 0};
  run_gemm(path, a, w, e);
  return y.reshape(out_sizes);
}

i8::Path active_int8_path() { return int8_path(); }

const char* int8_path_name() { return path_name(int8_path()); }

void set_int8_path(const std::string& name) {
  if (name == "auto") {
    g_forced_path = -1;
    return;
  }
  for (i8::Path p : {i8::Path::Vnni512, i8::Path::AvxVnni, i8::Path::Avx2, i8::Path::Portable}) {
    if (name != path_name(p)) continue;
#if !defined(HFQUANT_X86)
    TORCH_CHECK(p == i8::Path::Portable, "hfquant: int8 path '", name, "' is not built on this architecture");
#endif
    TORCH_CHECK(can_run(p), "hfquant: this CPU cannot run the int8 path '", name, "'");
    g_forced_path = int(p);
    return;
  }
  TORCH_CHECK(false, "hfquant: unknown int8 path '", name, "' (use auto, avx512vnni, avxvnni, avx2 or portable)");
}

std::string int8_path_setting() {
  const int forced = g_forced_path.load(std::memory_order_relaxed);
  return forced < 0 ? std::string("auto") : std::string(path_name(i8::Path(forced)));
}

std::vector<std::string> available_int8_paths() {
  std::vector<std::string> out;
  for (i8::Path p : {i8::Path::Vnni512, i8::Path::AvxVnni, i8::Path::Avx2, i8::Path::Portable}) {
#if !defined(HFQUANT_X86)
    if (p != i8::Path::Portable) continue;
#endif
    if (can_run(p)) out.emplace_back(path_name(p));
  }
  return out;
}

}  // namespace hfquant::cpu

TORCH_LIBRARY_IMPL(hfquant, CPU, m) {
  m.impl("int8_pack", &hfquant::cpu::int8_pack_cpu);
  m.impl("quantize_act", &hfquant::cpu::quantize_act_cpu);
  m.impl("int8_mm", &hfquant::cpu::int8_mm_cpu);
  m.impl("int8_gemm", &hfquant::cpu::int8_gemm_cpu);
  m.impl("int8_linear", &hfquant::cpu::int8_linear_cpu);
}
