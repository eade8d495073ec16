// hfquant::repack and hfquant::qlinear on CPU: argument checks, the layout conversion,
// activation preparation and the choice between the GEMV kernels (small M, one pass over
// the packed weights per call) and the blocked path for large M (dequantize a block of
// rows into a small buffer, then the BLAS GEMM of ATen on it).
#include <ATen/ATen.h>
#include <type_traits>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "cpu/aten_util.h"
#include "cpu/cpu_features.h"
#include "cpu/qlinear.h"
#include "switches.h"

namespace hfquant::cpu {
namespace {

// Effective group length and group count for a (validated) group_size.
void group_geometry(int64_t group_size, int64_t K, int64_t& gs, int64_t& G) {
  if (group_size == -1) {
    G = 1;
    gs = round_up(K, kKAlign);
  } else {
    gs = group_size;
    G = (K + group_size - 1) / group_size;
  }
}

// Smallest M of the Gemm path; the gemm_min_m switch (switches.h) overrides.
// Measured (2 threads, Zen 5, SmolLM2 and 4096x4096 shapes): below, the GEMV kernels win,
// since the Gemm path's per-call dequantization of every weight to fp32 and its 16-row
// x^T slices are not yet amortized; the 4-bit GEMV (vdpbf16ps on hi/lo bf16 halves of x)
// holds out longer than the 8-bit one (fp32 FMA with a byte-to-float conversion).
int64_t gemm_min_m(Isa isa, int64_t bits) {
  if (const int64_t forced = switches::gemm_min_m(); forced > 0) return forced;
  if (isa == Isa::Avx2) return 12;  // AVX2 (8-wide FMA): even at M = 8, ahead from 16
  return bits == 4 ? 20 : 12;
}

void check_bits_group(const char* op, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 4 || bits == 8, "hfquant::", op, ": bits=", bits, " is not supported (use 4 or 8)");
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % 32 == 0), "hfquant::", op,
              ": group_size=", group_size, " must be -1 (per channel) or a positive multiple of 32");
}

// Which kernel serves a call.
//   Gemv   : the GEMV kernels, one pass over the packed weights (small M).
//   Gemm   : the register-blocked fp32 GEMM (qgemm_kernel.h; AVX-512 and AVX2, all x dtypes
//            except bf16 x on avx512bf16 CPUs).
//   Blocked: dequantize a block of rows, then ATen's GEMM (bf16 x on avx512bf16 CPUs, the
//            portable path, or the Gemm path turned off).
enum class Path { Gemv, Gemm, Blocked };

// Largest M served by the GEMV kernels, and which path takes larger M.
// The gemv_max_m switch overrides the first, qgemm=false disables the Gemm path (switches.h).
// Defaults from measurements (2 threads, Zen 5, 4096x4096 and 11008x4096, W4 g128 and
// W8; the box was shared, so +-30%):
//  - bf16 x: the GEMM is oneDNN's bf16 one; crossover M ~ 24 for W4 (vdpbf16ps kernel),
//    ~ 10 for W8 (its kernel multiplies in fp32).
//  - fp32/fp16 x on AVX-512 CPUs, every x on AVX2: the Gemm path from M = gemm_min_m on,
//    at every layer size (at M = 128 it runs at about 90% of the FMA peak: 2.1-3.0x
//    F.linear fp32 on SmolLM2's and Llama-7B's shapes with AVX-512, where the GEMV kernels
//    gave 1.0-1.8x).
//  - With the Gemm path off: fp32/fp16 x stayed on the GEMV kernels to M = 128 on
//    avx512bf16 CPUs, ~ 32 on avx512 ones; on AVX2 the crossover was ~ 16 (fp32), ~ 6 (bf16).
//  - portable: the GEMV is scalar, the blocked path wins almost at once.
// Tiny layers (below 256K weights) stay on the GEMV kernels unless the Gemm path serves
// them: there the BLAS GEMM's packing and thread start-up cost more than they save.
bool has_gemm_path(Isa isa, at::ScalarType xt) {
  // bf16 x on avx512bf16 CPUs keeps the bf16 paths (vdpbf16ps GEMV, oneDNN's bf16 GEMM).
  return switches::qgemm() &&
         (isa == Isa::Avx512Bf16 ? xt != at::kBFloat16 : isa == Isa::Avx512 || isa == Isa::Avx2);
}

// The largest M of the GEMV kernels (Gemv for M <= this, the larger-M path above).
int64_t gemv_limit(Isa isa, at::ScalarType xt, int64_t bits, int64_t N, int64_t Kp) {
  const int64_t forced_max_m = switches::gemv_max_m();
  const bool bf16 = xt == at::kBFloat16;
  if (forced_max_m >= 0) return forced_max_m;
  if (has_gemm_path(isa, xt)) return gemm_min_m(isa, bits) - 1;
  if (N * Kp < (int64_t(1) << 18)) return INT64_MAX;
  int64_t max_m;
  switch (isa) {
    // avx512bf16 measured with 2 threads at 4096x4096: bf16 W4 GEMV wins to M=64, W8 to M=16;
    // fp32 x (Gemm path off): the GEMV kernels stayed ahead of MKL's fp32 GEMM to M = 128.
    case Isa::Avx512Bf16: max_m = bf16 ? (bits == 4 ? 64 : 16) : 128; break;
    case Isa::Avx512: max_m = bf16 ? (bits == 4 ? 16 : 8) : 32; break;
    case Isa::Avx2: max_m = bf16 ? 8 : 16; break;
    default: max_m = 2;
  }
  return max_m;
}

Path choose_path(Isa isa, at::ScalarType xt, int64_t bits, int64_t M, int64_t N, int64_t Kp) {
  if (M <= gemv_limit(isa, xt, bits, N, Kp)) return Path::Gemv;
  return has_gemm_path(isa, xt) ? Path::Gemm : Path::Blocked;
}

// Rows dequantized per GEMM call on the blocked path (the block_rows switch overrides):
// a buffer of about 16 MiB (L3 sized). Few blocks mean few parallel regions and GEMM
// calls (each costs a thread wake-up and a repack of x inside the BLAS); the GEMM is
// compute bound at these M, so reading its B panels from L3 instead of L2 costs little.
int64_t blocked_rows(int64_t Kp, int64_t esize) {
  const int64_t forced = switches::block_rows();
  const int64_t r = forced > 0 ? forced : (int64_t(16) << 20) / (Kp * esize);
  return std::max<int64_t>(kNR, r / kNR * kNR);
}

struct IsaFns {
  GemvKernel gemv;
  PrepareFn prepare;
  DequantFn dequant;
  TransposeXFn transpose_x;  // Gemm path (nullptr: none on this ISA)
  GemmKernel gemm;
};

IsaFns fns_for(Isa isa) {
  switch (isa) {
#if defined(HFQUANT_X86)
    case Isa::Avx512Bf16:
      return {gemv_avx512bf16, prepare_avx512, dequant_tiles_avx512, transpose_x_avx512, gemm_avx512};
    case Isa::Avx512: return {gemv_avx512, prepare_avx512, dequant_tiles_avx512, transpose_x_avx512, gemm_avx512};
    case Isa::Avx2: return {gemv_avx2, prepare_avx2, dequant_tiles_avx2, transpose_x_avx2, gemm_avx2};
#endif
    default: return {gemv_portable, prepare_portable, dequant_tiles_portable, nullptr, nullptr};
  }
}

}  // namespace

GemvPlan qlinear_gemv_plan(DType xt, int64_t bits, int64_t N, int64_t Kp) {
  const Isa isa = active_isa();
  const IsaFns fns = fns_for(isa);
  const at::ScalarType st = xt == DType::BF16 ? at::kBFloat16 : xt == DType::F16 ? at::kHalf : at::kFloat;
  return {fns.gemv, fns.prepare, isa == Isa::Avx512Bf16 && bits == 4, gemv_limit(isa, st, bits, N, Kp)};
}

// qweight: 4-bit uint8 [N, ceil(K/2)] (element k in byte k/2, low nibble for even k),
//          8-bit int8 [N, K] (symmetric) or uint8 [N, K] (asymmetric, with zeros);
// scales : float32/bfloat16/float16 [N, G], G = ceil(K/group_size) (1 for group_size -1);
// zeros  : optional uint8 [N, G] zero points (0..15 or 0..255); absent = symmetric;
// offsets: optional float [N, G] (instead of zeros): weight = code * scale + offset, codes
//          unsigned as with zeros; the layout's second value is then s * OFF - offset.
// Returns (packed_weight uint8 [T, Kp/32|Kp/16, 4, 16], packed_scales float32 [T, G, 2, 4]).
std::tuple<at::Tensor, at::Tensor> repack_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                                              const std::optional<at::Tensor>& zeros, int64_t bits,
                                              int64_t group_size, int64_t in_features,
                                              const std::optional<at::Tensor>& offsets) {
  check_bits_group("repack", bits, group_size);
  const int64_t K = in_features;
  TORCH_CHECK(K > 0, "hfquant::repack: in_features=", K, " must be positive");
  TORCH_CHECK(qweight.dim() == 2, "hfquant::repack: qweight must be 2-D, got ", qweight.dim(), "-D");
  const int64_t N = qweight.size(0);
  TORCH_CHECK(N > 0, "hfquant::repack: qweight has no rows");
  if (bits == 4) {
    TORCH_CHECK(qweight.scalar_type() == at::kByte, "hfquant::repack: 4-bit qweight must be uint8, got ",
                qweight.scalar_type());
    TORCH_CHECK(qweight.size(1) == (K + 1) / 2, "hfquant::repack: 4-bit qweight has ", qweight.size(1),
                " columns, expected ceil(in_features/2)=", (K + 1) / 2);
  } else {
    const bool asym = zeros.has_value() || offsets.has_value();
    TORCH_CHECK(qweight.scalar_type() == (asym ? at::kByte : at::kChar), "hfquant::repack: 8-bit ",
                asym ? "asymmetric qweight must be uint8" : "symmetric qweight must be int8", ", got ",
                qweight.scalar_type());
    TORCH_CHECK(qweight.size(1) == K, "hfquant::repack: 8-bit qweight has ", qweight.size(1),
                " columns, expected in_features=", K);
  }
  int64_t gs, G;
  group_geometry(group_size, K, gs, G);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G, "hfquant::repack: scales has shape ",
              scales.sizes(), ", expected [", N, ", ", G, "]");
  TORCH_CHECK(scales.is_floating_point(), "hfquant::repack: scales must be floating point, got ",
              scales.scalar_type());
  if (zeros) {
    TORCH_CHECK(zeros->scalar_type() == at::kByte, "hfquant::repack: zeros must be uint8, got ",
                zeros->scalar_type());
    TORCH_CHECK(zeros->dim() == 2 && zeros->size(0) == N && zeros->size(1) == G, "hfquant::repack: zeros has shape ",
                zeros->sizes(), ", expected [", N, ", ", G, "]");
    TORCH_CHECK(zeros->device() == qweight.device(), "hfquant::repack: zeros is on ", zeros->device(),
                ", qweight on ", qweight.device());
  }
  if (offsets) {
    TORCH_CHECK(!zeros, "hfquant::repack: zeros and offsets are exclusive (integer zero points or float offsets)");
    TORCH_CHECK(offsets->is_floating_point(), "hfquant::repack: offsets must be floating point, got ",
                offsets->scalar_type());
    TORCH_CHECK(offsets->dim() == 2 && offsets->size(0) == N && offsets->size(1) == G,
                "hfquant::repack: offsets has shape ", offsets->sizes(), ", expected [", N, ", ", G, "]");
    TORCH_CHECK(offsets->device().is_cpu(), "hfquant::repack: offsets is on ", offsets->device(),
                ", qweight on ", qweight.device());
  }
  TORCH_CHECK(qweight.device().is_cpu() && scales.device().is_cpu(),
              "hfquant::repack: CPU kernel called with tensors on ", qweight.device());

  const int64_t Kp = round_up(K, kKAlign), T = (N + kNR - 1) / kNR;
  const int64_t unit = bits == 4 ? 32 : 16, U = Kp / unit;
  at::Tensor w = at::zeros({T, U, kNR, 16}, qweight.options().dtype(at::kByte));
  at::Tensor sb = at::zeros({T, G, 2, kNR}, scales.options().dtype(at::kFloat));
  at::Tensor qw = qweight.contiguous();
  at::Tensor sc = scales.to(at::kFloat).contiguous();
  at::Tensor zp = zeros ? zeros->contiguous() : at::Tensor();
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qw.data_ptr());
  const float* s = sc.data_ptr<float>();
  const uint8_t* z = zp.defined() ? zp.data_ptr<uint8_t>() : nullptr;
  at::Tensor mo = offsets ? offsets->to(at::kFloat).contiguous() : at::Tensor();
  const float* m = mo.defined() ? mo.data_ptr<float>() : nullptr;
  uint8_t* wo = w.data_ptr<uint8_t>();
  float* so = sb.data_ptr<float>();
  const int64_t qcols = qw.size(1);
  const int zmax = bits == 4 ? 15 : 255;
  const float off = bits == 4 ? 128.f : 0.f;
  const int sym_zero = bits == 4 ? 8 : 128;
  // Zero points out of range would decode to garbage: refuse them here.
  if (z) {
    for (int64_t i = 0; i < N * G; ++i)
      TORCH_CHECK(z[i] <= zmax, "hfquant::repack: zero point ", int(z[i]), " at index ", i,
                  " is out of range for ", bits, "-bit (0..", zmax, ")");
  }
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t r = 0; r < kNR; ++r) {
        const int64_t n = t * kNR + r;
        if (n >= N) break;
        const uint8_t* row = q + n * qcols;
        for (int64_t k = 0; k < K; ++k) {
          int v;
          if (bits == 4) {
            const uint8_t byte = row[k / 2];
            v = (k & 1) ? (byte >> 4) : (byte & 0x0F);
            const int64_t u = k / 32, j = k % 32;
            uint8_t& dst = wo[((t * U + u) * kNR + r) * 16 + (j & 15)];
            dst |= j < 16 ? uint8_t(v) : uint8_t(v << 4);
          } else {
            // symmetric int8 is stored as v = q + 128 (two's complement flip of the sign bit)
            v = (z || m) ? row[k] : (row[k] ^ 0x80);
            wo[((t * U + k / 16) * kNR + r) * 16 + (k % 16)] = uint8_t(v);
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          const float sc_ = s[n * G + g];
          so[((t * G + g) * 2 + 0) * kNR + r] = sc_;
          if (m) {
            so[((t * G + g) * 2 + 1) * kNR + r] = sc_ * off - m[n * G + g];
          } else {
            const int zz = z ? int(z[n * G + g]) : sym_zero;
            so[((t * G + g) * 2 + 1) * kNR + r] = sc_ * (float(zz) + off);
          }
        }
      }
    }
  });
  return {w, sb};
}

// Scratch for prepared activations (the GEMV path, qlinear_a8): reused per calling thread so a
// decode step allocates nothing; buffers above 8 MiB (large M * K) are not kept.
uint8_t* scratch(int64_t bytes, at::Tensor& holder) {
  thread_local at::Tensor cache;
  constexpr int64_t kKeep = int64_t(8) << 20;
  if (bytes > kKeep) {
    holder = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
    return holder.data_ptr<uint8_t>();
  }
  if (!cache.defined() || cache.numel() < bytes) cache = at::empty({kKeep}, at::TensorOptions().dtype(at::kByte));
  return cache.data_ptr<uint8_t>();
}

PackedGeometry check_packed(const char* op, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                            int64_t bits, int64_t group_size, int64_t N, int64_t K) {
  PackedGeometry g{};
  group_geometry(group_size, K, g.gs, g.G);
  g.Kp = round_up(K, kKAlign);
  g.T = (N + kNR - 1) / kNR;
  g.U = g.Kp / (bits == 4 ? 32 : 16);
  TORCH_CHECK(packed_weight.scalar_type() == at::kByte && packed_weight.is_contiguous() &&
                  packed_weight.device().is_cpu(),
              "hfquant::", op, ": packed_weight must be a contiguous uint8 CPU tensor (from hfquant::repack)");
  TORCH_CHECK(packed_weight.dim() == 4 && packed_weight.size(0) == g.T && packed_weight.size(1) == g.U &&
                  packed_weight.size(2) == kNR && packed_weight.size(3) == 16,
              "hfquant::", op, ": packed_weight has shape ", packed_weight.sizes(), ", expected [", g.T, ", ", g.U,
              ", 4, 16] for bits=", bits, ", out_features=", N, ", in_features=", K);
  TORCH_CHECK(packed_scales.scalar_type() == at::kFloat && packed_scales.is_contiguous() &&
                  packed_scales.device().is_cpu(),
              "hfquant::", op, ": packed_scales must be a contiguous float32 CPU tensor (from hfquant::repack)");
  TORCH_CHECK(packed_scales.dim() == 4 && packed_scales.size(0) == g.T && packed_scales.size(1) == g.G &&
                  packed_scales.size(2) == 2 && packed_scales.size(3) == kNR,
              "hfquant::", op, ": packed_scales has shape ", packed_scales.sizes(), ", expected [", g.T, ", ",
              g.G, ", 2, 4] for group_size=", group_size, ", in_features=", K);
  return g;
}

// x            : float32/bfloat16/float16 [..., K], any strides
// packed_weight: uint8 [T, Kp/32 (4-bit) or Kp/16 (8-bit), 4, 16]   (from repack)
// packed_scales: float32 [T, G, 2, 4]                                (from repack)
// bias         : optional [N], any floating dtype
// returns      : x.dtype [..., N]
PackedGeometry check_linear_call(const char* op, const at::Tensor& x, const at::Tensor& packed_weight,
                                 const at::Tensor& packed_scales, const std::optional<at::Tensor>& bias, int64_t bits,
                                 int64_t group_size, int64_t N, int64_t K, const char* device_hint) {
  check_bits_group(op, bits, group_size);
  TORCH_CHECK(N > 0 && K > 0, "hfquant::", op, ": out_features=", N, " and in_features=", K, " must be positive");
  TORCH_CHECK(x.device().is_cpu(), "hfquant::", op, ": x is on ", x.device(), " but this is the CPU kernel",
              device_hint);
  TORCH_CHECK(is_float(x.scalar_type()), "hfquant::", op, ": x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "hfquant::", op, ": x has last dimension ", x.dim() ? x.size(-1) : 0,
              ", expected in_features=", K);
  const PackedGeometry geo = check_packed(op, packed_weight, packed_scales, bits, group_size, N, K);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "hfquant::", op, ": bias has shape ", bias->sizes(),
                ", expected [", N, "]");
    TORCH_CHECK(bias->is_floating_point() && bias->device().is_cpu(), "hfquant::", op,
                ": bias must be a floating point CPU tensor");
  }
  return geo;
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                       const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                       int64_t out_features, int64_t in_features) {
  const int64_t N = out_features, K = in_features;
  const PackedGeometry geo = check_linear_call("qlinear", x, packed_weight, packed_scales, bias, bits, group_size, N,
                                               K, " (is the CUDA extension built?)");
  const int64_t gs = geo.gs, G = geo.G, Kp = geo.Kp, T = geo.T;

  PackedView p{packed_weight.data_ptr<uint8_t>(), packed_scales.data_ptr<float>(), bits, N, K, Kp, T, G, gs};
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  const at::Tensor x2d = x.reshape({-1, K});
  const int64_t M = x2d.size(0);
  if (M == 0) return at::empty(out_sizes, x.options());

  const Isa isa = active_isa();
  const IsaFns fns = fns_for(isa);
  at::Tensor y;
  const Path path = choose_path(isa, x.scalar_type(), bits, M, N, Kp);
  const DType xt = dtype_of(x.scalar_type());
  at::Tensor b32;
  if (bias && path != Path::Blocked)
    b32 = bias->scalar_type() == at::kFloat ? bias->contiguous() : bias->to(at::kFloat);
  if (path == Path::Gemm) {
    // Gemm path: x^T in 16-row slices straight from x, then panels of 12 dequantized
    // weight rows against all of it; bias and the cast to x.dtype fused into the store.
    TORCH_CHECK(fns.gemm, "hfquant::qlinear: no Gemm kernel on the ", isa_name(isa), " path");
    const at::Tensor xk = x2d.stride(1) == 1 ? x2d : x2d.contiguous();
    const int64_t C = (M + 15) / 16;
    at::Tensor holder;
    float* xtr = reinterpret_cast<float*>(scratch(C * 16 * Kp * 4, holder));
    y = at::empty({M, N}, x.options());
    const OutView o{y.data_ptr(), xt, N, bias ? b32.data_ptr<float>() : nullptr};
    // at least ~32K values per transpose task: small x is transposed without a thread wake-up
    const int64_t tgrain = std::max<int64_t>(1, (int64_t(1) << 15) / (16 * Kp));
    at::parallel_for(0, C, tgrain, [&](int64_t c0, int64_t c1) {
      fns.transpose_x(xk.data_ptr(), xt, xk.stride(0), M, K, Kp, xtr, c0, c1);
    });
    // Tasks get whole panels of 3 tiles (12 rows), at least 2 each.
    const int64_t P = (T + 2) / 3;
    at::parallel_for(0, P, 2, [&](int64_t q0, int64_t q1) { fns.gemm(p, xtr, M, o, 3 * q0, std::min(T, 3 * q1)); });
  } else if (path == Path::Gemv) {
    // GEMV path: one pass over the packed weights; x prepared once (fp32, padded, group
    // sums, bf16 hi/lo for the avx512bf16 4-bit kernel), bias and the cast to x.dtype
    // fused into the kernel's store.
    const bool split = isa == Isa::Avx512Bf16 && bits == 4;
    const at::Tensor xk = x2d.stride(1) == 1 ? x2d : x2d.contiguous();
    const int64_t xbytes = round_up(M * Kp * 4, 64), sbytes = round_up(M * G * 4, 64);
    const int64_t hbytes = split ? round_up(M * Kp * 2, 64) : 0;
    at::Tensor holder;
    uint8_t* buf = scratch(xbytes + sbytes + 2 * hbytes, holder);
    float* xo = reinterpret_cast<float*>(buf);
    float* xs = reinterpret_cast<float*>(buf + xbytes);
    uint16_t* xhi = split ? reinterpret_cast<uint16_t*>(buf + xbytes + sbytes) : nullptr;
    uint16_t* xlo = split ? reinterpret_cast<uint16_t*>(buf + xbytes + sbytes + hbytes) : nullptr;
    fns.prepare(xk.data_ptr(), xt, xk.stride(0), M, p, split, xo, xs, xhi, xlo);
    ActView a{xo, xs, xhi, xlo, split && xt != DType::BF16, M};
    y = at::empty({M, N}, x.options());
    const OutView o{y.data_ptr(), xt, N, bias ? b32.data_ptr<float>() : nullptr};
    const GemvKernel kern = fns.gemv;
    // Tasks get whole steps of kGemvTileStep tiles (the M = 1 kernels group tiles from the
    // start of their range: the same result for any thread count), a grain of 8 tiles (32
    // rows) keeps per-thread work above the scheduling cost.
    const int64_t steps = (T + kGemvTileStep - 1) / kGemvTileStep;
    at::parallel_for(0, steps, 8 / kGemvTileStep, [&](int64_t q0, int64_t q1) {
      kern(p, a, o, q0 * kGemvTileStep, std::min(T, q1 * kGemvTileStep));
    });
  } else {
    // Blocked path: dequantize a block of rows into a buffer that stays in L2/L3, then
    // ATen's GEMM on it.
    // bf16 GEMM only where the CPU has bf16 dot products: elsewhere ATen's bf16 GEMM is far
    // slower than fp32 (measured with --isa avx2: 0.4x of fp32), so compute in fp32.
    const bool bf16_gemm = x.scalar_type() == at::kBFloat16 && isa == Isa::Avx512Bf16;
    const at::ScalarType cdt = bf16_gemm ? at::kBFloat16 : at::kFloat;
    const at::Tensor xc = x2d.to(cdt).contiguous();
    y = at::empty({M, N}, x.options().dtype(cdt));
    const int64_t block_tiles = blocked_rows(Kp, cdt == at::kFloat ? 4 : 2) / kNR;
    at::Tensor wbuf = at::empty({std::min(T, block_tiles) * kNR, Kp}, x.options().dtype(cdt));
    const DequantFn deq = fns.dequant;
    const DType wt = dtype_of(cdt);
    for (int64_t t0 = 0; t0 < T; t0 += block_tiles) {
      const int64_t t1 = std::min(T, t0 + block_tiles);
      const int64_t rows = std::min(N, t1 * kNR) - t0 * kNR;
      uint8_t* wb = static_cast<uint8_t*>(wbuf.data_ptr());
      const int64_t esize = wbuf.element_size();
      // At least ~64K weights per task: tiny layers dequantize inline, no thread wake-up.
      const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (kNR * Kp));
      at::parallel_for(t0, t1, grain, [&](int64_t a0, int64_t a1) {
        deq(p, wb + (a0 - t0) * kNR * Kp * esize, wt, Kp, a0, a1);
      });
      at::Tensor wblk = wbuf.narrow(0, 0, rows).narrow(1, 0, K);
      at::Tensor yblk = y.narrow(1, t0 * kNR, rows);
      at::mm_out(yblk, xc, wblk.t());
    }
    if (bias) y.add_(bias->to(cdt));
    if (cdt != x.scalar_type()) y = y.to(x.scalar_type());
  }
  return y.reshape(out_sizes);
}

// Rows of the weight in the kernel layout: the lookup of a quantized embedding (the token
// embedding stored as an [N = vocab, K = dim] weight, possibly shared with a tied lm_head).
// ids          : int64 or int32 [...], each in [0, N)
// packed_weight: uint8 [T, Kp/32 (4-bit) or Kp/16 (8-bit), 4, 16]   (from repack)
// packed_scales: float32 [T, G, 2, 4]                                (from repack)
// returns      : dtype [..., K], row ids[i] of (v - z) * s in fp32 (as formats.dequantize), cast once
at::Tensor qembedding_cpu(const at::Tensor& ids, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                          int64_t bits, int64_t group_size, int64_t out_features, int64_t in_features,
                          at::ScalarType dtype) {
  check_bits_group("qembedding", bits, group_size);
  const int64_t N = out_features, K = in_features;
  TORCH_CHECK(N > 0 && K > 0, "hfquant::qembedding: out_features=", N, " and in_features=", K,
              " must be positive");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "hfquant::qembedding: ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(ids.device().is_cpu(), "hfquant::qembedding: ids is on ", ids.device(),
              " but this is the CPU kernel");
  TORCH_CHECK(is_float(dtype), "hfquant::qembedding: dtype must be float32, bfloat16 or float16, got ", dtype);
  const PackedGeometry geo = check_packed("qembedding", packed_weight, packed_scales, bits, group_size, N, K);
  const int64_t gs = geo.gs, G = geo.G, U = geo.U;

  const at::Tensor idx = ids.to(at::kLong).contiguous();
  const int64_t n_ids = idx.numel();
  const int64_t* id = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < n_ids; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < N, "hfquant::qembedding: id ", id[i], " at position ", i,
                " is out of range for ", N, " rows");
  }
  auto out_sizes = ids.sizes().vec();
  out_sizes.push_back(K);
  at::Tensor out = at::empty(out_sizes, ids.options().dtype(dtype));
  if (n_ids == 0) return out;
  const uint8_t* pw = packed_weight.data_ptr<uint8_t>();
  const float* sb = packed_scales.data_ptr<float>();
  const float off = bits == 4 ? 128.f : 0.f;
  const int64_t tile_bytes = U * kNR * 16;
  dispatch_float(dtype, "qembedding", "dtype", [&](auto* tag) {
    using T_out = std::remove_pointer_t<decltype(tag)>;
    T_out* o = out.data_ptr<T_out>();
    at::parallel_for(0, n_ids, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = id[i], t = n / kNR, r = n % kNR;
        const uint8_t* tw = pw + t * tile_bytes + r * 16;  // row r of unit u at tw + u * 4 * 16
        T_out* dst = o + i * K;
        for (int64_t g = 0; g < G; ++g) {
          const float* sg = sb + (t * G + g) * 2 * kNR;
          // the layout holds s and s * (z + off); z is integral, so it is recovered exactly and
          // the row is (v - z) * s, bit for bit what the checkpoint tensors stand for (a layout
          // made with float offsets is not an embedding's: QuantEmbedding has integer zeros)
          const float s = sg[r];
          const float z = s != 0.f ? std::nearbyint(sg[kNR + r] / s) - off : 0.f;
          const int64_t k1 = std::min(K, (g + 1) * gs);
          for (int64_t k = g * gs; k < k1; ++k) {
            int v;
            if (bits == 4) {
              const uint8_t b = tw[(k / 32) * kNR * 16 + (k % 16)];
              v = (k % 32) < 16 ? (b & 0x0F) : (b >> 4);
            } else {
              v = tw[(k / 16) * kNR * 16 + (k % 16)];
            }
            dst[k] = static_cast<T_out>((static_cast<float>(v) - z) * s);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace hfquant::cpu

TORCH_LIBRARY_IMPL(hfquant, CPU, m) {
  m.impl("repack", &hfquant::cpu::repack_cpu);
  m.impl("qlinear", &hfquant::cpu::qlinear_cpu);
  m.impl("qembedding", &hfquant::cpu::qembedding_cpu);
}
