// Quantized KV cache ops on CPU (KIVI, Liu et al. 2024): keys per channel, values per token.
//
// A state x [..., T, D] (D = head_dim) is quantized asymmetrically to `bits` (8, 4, 2):
//   per token   (values): groups of g consecutive channels of one token;
//                          scales/mins [..., T, D/g]
//   per channel (keys)  : groups of g consecutive tokens of one channel (T a multiple of g);
//                          scales/mins [..., T/g, D]
// For a group with minimum lo and maximum hi: scale = (hi - lo) / (2^bits - 1) and min = lo,
// both stored as float16; codes c = clamp(round_half_even((x - min) * (1 / scale)), 0,
// 2^bits - 1) computed from the stored (rounded) values, 0 where scale is 0; x' = c * scale +
// min. Codes are packed along D in planes: with R = D * bits / 8 bytes per token, element
// d sits in byte d % R at bit (d / R) * bits (so each bit plane holds consecutive channels
// and unpacking is a contiguous, vectorizable loop).
// NaN/Inf in a group make its scale/min NaN (the dequantized group is NaN).
//
// kv_append quantizes a block of new tokens straight into preallocated stores at a token
// offset (the cache grows them); kv_dequantize returns the states in the attention's dtype,
// kv_dequantize_into writes them into the first tokens of a larger buffer. Scales and
// minimums are float16: states beyond +-65504 make their group +-inf.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/aten_util.h"
#include "cpu/cpu_features.h"
#include "cpu/hadamard.h"

namespace hfquant::cpu {
namespace {

void check_scheme(const char* op, int64_t bits, int64_t group_size, int64_t D, int64_t T, bool per_channel) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "hfquant::", op, ": bits=", bits, " is not supported (use 2, 4 or 8)");
  TORCH_CHECK(group_size > 0, "hfquant::", op, ": group_size=", group_size, " must be positive");
  TORCH_CHECK(D > 0 && (D * bits) % 8 == 0, "hfquant::", op, ": head_dim=", D, " does not pack into whole bytes at ",
              bits, " bits");
  if (per_channel) {
    TORCH_CHECK(T % group_size == 0, "hfquant::", op, ": per-channel (key) quantization needs a whole number of ",
                group_size, "-token groups; got ", T, " tokens");
  } else {
    TORCH_CHECK(D % group_size == 0, "hfquant::", op, ": group_size=", group_size,
                " does not divide head_dim=", D);
  }
}

// One group: n values at stride `step` (floats), quantized with the stored scale/min.
struct GroupParams {
  c10::Half scale, min;
  float inv;  // 1 / scale, 0 for a constant group
};

GroupParams group_params(float lo, float hi, int64_t qmax) {
  GroupParams g;
  if (!std::isfinite(lo) || !std::isfinite(hi)) {
    g.scale = g.min = c10::Half(std::numeric_limits<float>::quiet_NaN());
    g.inv = 0.f;
    return g;
  }
  g.scale = c10::Half((hi - lo) / float(qmax));
  g.min = c10::Half(lo);
  const float s = float(g.scale);
  g.inv = s > 0.f ? 1.f / s : 0.f;
  return g;
}

inline uint8_t code(float x, const GroupParams& g, int64_t qmax) {
  const float c = std::nearbyint((x - float(g.min)) * g.inv);
  return uint8_t(std::min(float(qmax), std::max(0.f, c)));
}

// Quantizes rows [T, D] of one (batch, head) into codes [T, D*bits/8] and params, for
// tokens [0, T) of x written at token offset `at` of the stores.
template <typename X>
void quantize_head(const X* x, int64_t T, int64_t D, int64_t bits, int64_t g, bool per_channel, uint8_t* codes,
                   c10::Half* scales, c10::Half* mins, int64_t at) {
  const int64_t qmax = (int64_t(1) << bits) - 1, row_bytes = D * bits / 8;
  auto put = [&](int64_t t, int64_t d, uint8_t c) {
    uint8_t& b = codes[(at + t) * row_bytes + d % row_bytes];
    const int shift = int((d / row_bytes) * bits);
    b = uint8_t((b & ~(qmax << shift)) | (c << shift));
  };
  if (per_channel) {
    const int64_t G = D;  // params per token-group row
    for (int64_t t0 = 0; t0 < T; t0 += g) {
      const int64_t prow = (at + t0) / g;
      for (int64_t d = 0; d < D; ++d) {
        float lo = std::numeric_limits<float>::infinity(), hi = -lo;
        bool finite = true;
        for (int64_t t = t0; t < t0 + g; ++t) {
          const float v = float(x[t * D + d]);
          finite = finite && std::isfinite(v);
          lo = std::min(lo, v);
          hi = std::max(hi, v);
        }
        const GroupParams p = group_params(finite ? lo : NAN, hi, qmax);
        scales[prow * G + d] = p.scale;
        mins[prow * G + d] = p.min;
        for (int64_t t = t0; t < t0 + g; ++t) put(t, d, finite ? code(float(x[t * D + d]), p, qmax) : 0);
      }
    }
  } else {
    const int64_t G = D / g;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < G; ++j) {
        const X* xs = x + t * D + j * g;
        float lo = std::numeric_limits<float>::infinity(), hi = -lo;
        bool finite = true;
        for (int64_t i = 0; i < g; ++i) {
          const float v = float(xs[i]);
          finite = finite && std::isfinite(v);
          lo = std::min(lo, v);
          hi = std::max(hi, v);
        }
        const GroupParams p = group_params(finite ? lo : NAN, hi, qmax);
        scales[(at + t) * G + j] = p.scale;
        mins[(at + t) * G + j] = p.min;
        for (int64_t i = 0; i < g; ++i) put(t, j * g + i, finite ? code(float(xs[i]), p, qmax) : 0);
      }
    }
  }
}

// float -> Y, round to nearest even (NaN stays NaN); plain integer code for bfloat16 so
// that the row loops below vectorize.
template <typename Y>
inline __attribute__((always_inline)) Y to_dtype(float f) {
  if constexpr (std::is_same_v<Y, c10::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t r = f != f ? 0x7FC0u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return c10::BFloat16(uint16_t(r), c10::BFloat16::from_bits());
  } else {
    return Y(f);
  }
}

// One token row: codes (planar, see the top) -> y = c * s[d] + m[d] in Y.
template <typename Y, int BITS>
inline __attribute__((always_inline)) void dequant_row(const uint8_t* row, const float* s, const float* m, int64_t D,
                                                       Y* y) {
  constexpr int kPer = 8 / BITS, kMask = (1 << BITS) - 1;
  const int64_t R = D / kPer;
  for (int slot = 0; slot < kPer; ++slot) {
    const float* sp = s + slot * R;
    const float* mp = m + slot * R;
    Y* yp = y + slot * R;
    for (int64_t j = 0; j < R; ++j) yp[j] = to_dtype<Y>(float((row[j] >> (slot * BITS)) & kMask) * sp[j] + mp[j]);
  }
}

// Tokens [0, T) of one head. Params are expanded to one float per channel once per group
// of rows (per channel) or per row (per token).
template <typename Y, int BITS>
inline __attribute__((always_inline)) void dequant_head_impl(const uint8_t* codes, const c10::Half* scales,
                                                             const c10::Half* mins, int64_t T, int64_t D, int64_t g,
                                                             bool per_channel, Y* y) {
  const int64_t row_bytes = D * BITS / 8, G = per_channel ? D : D / g;
  float s[512], m[512];  // D <= 512, checked
  for (int64_t t = 0; t < T; ++t) {
    if (per_channel && t % g == 0) {
      for (int64_t d = 0; d < D; ++d) {
        s[d] = float(scales[(t / g) * G + d]);
        m[d] = float(mins[(t / g) * G + d]);
      }
    } else if (!per_channel) {
      // G = D / g groups per token: convert G pairs, then fill (vectorized)
      for (int64_t j = 0; j < G; ++j) {
        const float sj = float(scales[t * G + j]), mj = float(mins[t * G + j]);
        for (int64_t d = j * g; d < (j + 1) * g; ++d) {
          s[d] = sj;
          m[d] = mj;
        }
      }
    }
    dequant_row<Y, BITS>(codes + t * row_bytes, s, m, D, y + t * D);
  }
}

template <typename Y>
inline __attribute__((always_inline)) void dequant_head_bits(const uint8_t* codes, const c10::Half* scales,
                                                             const c10::Half* mins, int64_t T, int64_t D, int64_t bits,
                                                             int64_t g, bool per_channel, Y* y) {
  switch (bits) {
    case 8: dequant_head_impl<Y, 8>(codes, scales, mins, T, D, g, per_channel, y); break;
    case 4: dequant_head_impl<Y, 4>(codes, scales, mins, T, D, g, per_channel, y); break;
    default: dequant_head_impl<Y, 2>(codes, scales, mins, T, D, g, per_channel, y); break;
  }
}

// The same code compiled for the SIMD paths (chosen at run time with the rest of the
// kernels); the loops vectorize, fp contraction is off for the file so every path gives the
// reference's c * s + m bit for bit.
template <typename Y>
void dequant_head_portable(const uint8_t* c, const c10::Half* s, const c10::Half* m, int64_t T, int64_t D,
                           int64_t bits, int64_t g, bool pc, Y* y) {
  dequant_head_bits<Y>(c, s, m, T, D, bits, g, pc, y);
}
#if defined(HFQUANT_X86)
template <typename Y>
__attribute__((target("avx2,fma,f16c"))) void dequant_head_avx2(const uint8_t* c, const c10::Half* s,
                                                                const c10::Half* m, int64_t T, int64_t D,
                                                                int64_t bits, int64_t g, bool pc, Y* y) {
  dequant_head_bits<Y>(c, s, m, T, D, bits, g, pc, y);
}
template <typename Y>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void dequant_head_avx512(
    const uint8_t* c, const c10::Half* s, const c10::Half* m, int64_t T, int64_t D, int64_t bits, int64_t g, bool pc,
    Y* y) {
  dequant_head_bits<Y>(c, s, m, T, D, bits, g, pc, y);
}
#endif

template <typename Y>
void dequantize_head(const uint8_t* c, const c10::Half* s, const c10::Half* m, int64_t T, int64_t D, int64_t bits,
                     int64_t g, bool pc, Y* y) {
#if defined(HFQUANT_X86)
  switch (active_isa()) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return dequant_head_avx512<Y>(c, s, m, T, D, bits, g, pc, y);
    case Isa::Avx2: return dequant_head_avx2<Y>(c, s, m, T, D, bits, g, pc, y);
    default: break;
  }
#endif
  dequant_head_portable<Y>(c, s, m, T, D, bits, g, pc, y);
}

struct Stores {
  int64_t BH, T, D, row_bytes, prows, G;
};

// Checks codes/scales/mins of a store holding `T` tokens (capacity) and returns its geometry.
Stores check_stores(const char* op, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                    int64_t bits, int64_t group_size, bool per_channel) {
  TORCH_CHECK(codes.device().is_cpu() && scales.device().is_cpu() && mins.device().is_cpu(), "hfquant::", op,
              ": CPU kernel called with tensors on ", codes.device());
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() >= 2, "hfquant::", op,
              ": codes must be a contiguous uint8 tensor [..., T, D*bits/8], got ", codes.scalar_type(), " ",
              codes.sizes());
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "hfquant::", op, ": bits=", bits, " is not supported (use 2, 4 or 8)");
  const int64_t T = codes.size(-2), D = codes.size(-1) * 8 / bits;
  check_scheme(op, bits, group_size, D, T, per_channel);
  TORCH_CHECK(D <= 512, "hfquant::", op, ": head_dim=", D, " is larger than 512");
  auto want = codes.sizes().vec();
  want[want.size() - 2] = per_channel ? T / group_size : T;
  want.back() = per_channel ? D : D / group_size;
  for (const auto* t : {&scales, &mins}) {
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->sizes().vec() == want, "hfquant::", op,
                ": scales and mins must be contiguous float16 ", c10::IntArrayRef(want), ", got ", t->scalar_type(),
                " ", t->sizes());
  }
  const int64_t BH = codes.numel() / std::max<int64_t>(1, T * codes.size(-1));
  return {BH, T, D, codes.size(-1), want[want.size() - 2], want.back()};
}

}  // namespace

// Quantizes x [..., T, D] -> (codes uint8 [..., T, D*bits/8], scales fp16, mins fp16).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_quantize_cpu(const at::Tensor& x, int64_t bits,
                                                               int64_t group_size, bool per_channel) {
  TORCH_CHECK(x.device().is_cpu(), "hfquant::kv_quantize: x is on ", x.device(), " but this is the CPU kernel");
  TORCH_CHECK(x.dim() >= 2, "hfquant::kv_quantize: x must be [..., tokens, head_dim], got ", x.dim(), "-D");
  const int64_t T = x.size(-2), D = x.size(-1);
  check_scheme("kv_quantize", bits, group_size, D, T, per_channel);
  auto cs = x.sizes().vec();
  cs.back() = D * bits / 8;
  auto ps = x.sizes().vec();
  ps[ps.size() - 2] = per_channel ? T / group_size : T;
  ps.back() = per_channel ? D : D / group_size;
  at::Tensor codes = at::zeros(cs, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty(ps, x.options().dtype(at::kHalf));
  at::Tensor mins = at::empty(ps, x.options().dtype(at::kHalf));
  const at::Tensor xc = x.contiguous();
  const int64_t BH = T * D != 0 ? xc.numel() / (T * D) : 0;
  const int64_t G = ps.back(), P = ps[ps.size() - 2];
  dispatch_float(x.scalar_type(), "kv_quantize", "states", [&](auto* tag) {
    using X = std::remove_pointer_t<decltype(tag)>;
    const X* xp = xc.data_ptr<X>();
    at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        quantize_head(xp + b * T * D, T, D, bits, group_size, per_channel, codes.data_ptr<uint8_t>() + b * T * cs.back(),
                      scales.data_ptr<c10::Half>() + b * P * G, mins.data_ptr<c10::Half>() + b * P * G, 0);
    });
  });
  return {codes, scales, mins};
}

// Quantizes x [..., t, D] into the stores (capacity T tokens) at token `offset`, in place.
void kv_append_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                   int64_t offset, int64_t bits, int64_t group_size, bool per_channel) {
  const Stores s = check_stores("kv_append", codes, scales, mins, bits, group_size, per_channel);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == codes.dim(), "hfquant::kv_append: x must be a CPU tensor [..., t, D] "
              "with the stores' leading dimensions");
  const int64_t t = x.size(-2);
  for (int64_t i = 0; i + 2 < x.dim(); ++i)
    TORCH_CHECK(x.size(i) == codes.size(i), "hfquant::kv_append: x has shape ", x.sizes(), ", the stores ",
                codes.sizes());
  TORCH_CHECK(x.size(-1) == s.D, "hfquant::kv_append: x has head_dim ", x.size(-1), ", the stores ", s.D);
  TORCH_CHECK(offset >= 0 && offset + t <= s.T, "hfquant::kv_append: tokens [", offset, ", ", offset + t,
              ") do not fit the stores' capacity of ", s.T);
  if (per_channel)
    TORCH_CHECK(offset % group_size == 0 && t % group_size == 0, "hfquant::kv_append: per-channel (key) blocks "
                "must start and end on ", group_size, "-token boundaries (offset ", offset, ", ", t, " tokens)");
  const at::Tensor xc = x.contiguous();
  dispatch_float(x.scalar_type(), "kv_append", "states", [&](auto* tag) {
    using X = std::remove_pointer_t<decltype(tag)>;
    const X* xp = xc.data_ptr<X>();
    at::parallel_for(0, s.BH, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        quantize_head(xp + b * t * s.D, t, s.D, bits, group_size, per_channel,
                      codes.data_ptr<uint8_t>() + b * s.T * s.row_bytes, scales.data_ptr<c10::Half>() + b * s.prows * s.G,
                      mins.data_ptr<c10::Half>() + b * s.prows * s.G, offset);
    });
  });
}

namespace {

// Writes the first `length` tokens of the stores into the first tokens of y [..., >= length, D];
// with `rotation_signs` (float32 [D], D a power of two) each token is then transformed in place
// as hfquant::hadamard_transform(..., signs, inverse=True) transforms it: signs * (H y) / sqrt(D).
void dequantize_into(const char* op, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                     const at::Tensor& y, int64_t length, int64_t bits, int64_t group_size, bool per_channel,
                     const at::Tensor* rotation_signs = nullptr) {
  const Stores s = check_stores(op, codes, scales, mins, bits, group_size, per_channel);
  const float* signs = nullptr;
  if (rotation_signs != nullptr) {
    const at::Tensor& r = *rotation_signs;
    TORCH_CHECK((s.D & (s.D - 1)) == 0, "hfquant::", op, ": head_dim=", s.D,
                " is not a power of two (rotate other sizes with hfquant.algorithms.rotation.HadamardRotation)");
    TORCH_CHECK(r.device().is_cpu(), "hfquant::", op, ": signs is on ", r.device(), " but this is the CPU kernel");
    TORCH_CHECK(r.scalar_type() == at::kFloat && r.dim() == 1 && r.size(0) == s.D && r.is_contiguous(), "hfquant::",
                op, ": signs must be a contiguous float32 vector of head_dim=", s.D, " values, got ", r.scalar_type(),
                " ", r.sizes());
    signs = r.data_ptr<float>();
  }
  TORCH_CHECK(length >= 0 && length <= s.T, "hfquant::", op, ": length=", length, " is outside the stores' ", s.T,
              " tokens");
  const at::ScalarType dtype = y.scalar_type();
  TORCH_CHECK(y.device().is_cpu() && y.is_contiguous() && y.dim() == codes.dim() && y.size(-1) == s.D &&
                  y.size(-2) >= length,
              "hfquant::", op, ": out must be a contiguous CPU tensor [..., >= ", length, ", ", s.D, "], got ",
              y.sizes());
  for (int64_t i = 0; i + 2 < y.dim(); ++i)
    TORCH_CHECK(y.size(i) == codes.size(i), "hfquant::", op, ": out has shape ", y.sizes(), ", the stores ",
                codes.sizes());
  const int64_t ty = y.size(-2);
  const FwhtRowFn fwht = fwht_row_kernel();
  const float scale = 1.0f / std::sqrt(float(s.D));
  dispatch_float(dtype, op, "out", [&](auto* tag) {
    using Y = std::remove_pointer_t<decltype(tag)>;
    Y* yp = y.data_ptr<Y>();
    // (head, block of >= 64 tokens) tasks so that one long head still uses every thread;
    // per-channel blocks are whole groups
    const int64_t blk = per_channel ? group_size * ((63 + group_size) / group_size) : 64;
    const int64_t nb = (length + blk - 1) / blk;
    at::parallel_for(0, s.BH * nb, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / nb, t0 = (i % nb) * blk, tn = std::min(blk, length - t0);
        const int64_t pr0 = per_channel ? t0 / group_size : t0;
        Y* out = yp + (b * ty + t0) * s.D;
        dequantize_head(codes.data_ptr<uint8_t>() + (b * s.T + t0) * s.row_bytes,
                        scales.data_ptr<c10::Half>() + (b * s.prows + pr0) * s.G,
                        mins.data_ptr<c10::Half>() + (b * s.prows + pr0) * s.G, tn, s.D, bits,
                        group_size, per_channel, out);
        if (signs != nullptr) {  // the rows just written are in L1: transform them there
          float v[512];
          for (int64_t t = 0; t < tn; ++t) {
            Y* row = out + t * s.D;
            float* f = v;
            if constexpr (std::is_same_v<Y, float>) {
              f = row;  // transformed where it lies
            } else {
              for (int64_t j = 0; j < s.D; ++j) v[j] = static_cast<float>(row[j]);
            }
            fwht(f, s.D, scale);
            for (int64_t j = 0; j < s.D; ++j) row[j] = static_cast<Y>(f[j] * signs[j]);
          }
        }
      }
    });
  });
}

}  // namespace

// The first `length` tokens of the stores -> a new [..., length, D] tensor in `dtype`.
at::Tensor kv_dequantize_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins, int64_t length,
                             int64_t bits, int64_t group_size, bool per_channel, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hfquant::kv_dequantize: dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(codes.dim() >= 2, "hfquant::kv_dequantize: codes must be [..., T, D*bits/8], got ", codes.sizes());
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "hfquant::kv_dequantize: bits=", bits,
              " is not supported (use 2, 4 or 8)");
  auto sz = codes.sizes().vec();
  sz[sz.size() - 2] = std::max<int64_t>(0, std::min<int64_t>(length, codes.size(-2)));
  sz.back() = codes.size(-1) * 8 / bits;
  at::Tensor y = at::empty(sz, codes.options().dtype(dtype));
  dequantize_into("kv_dequantize", codes, scales, mins, y, length, bits, group_size, per_channel);
  return y;
}

// kv_dequantize_into of per-token stores, each token then rotated back: signs * (H y) / sqrt(D).
void kv_dequantize_rotated_into_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                                    const at::Tensor& out, int64_t length, int64_t bits, int64_t group_size,
                                    const at::Tensor& signs) {
  dequantize_into("kv_dequantize_rotated_into", codes, scales, mins, out, length, bits, group_size, false, &signs);
}

// The same into the first `length` tokens of `out` [..., >= length, D] (its dtype), in place.
void kv_dequantize_into_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                            const at::Tensor& out, int64_t length, int64_t bits, int64_t group_size,
                            bool per_channel) {
  dequantize_into("kv_dequantize_into", codes, scales, mins, out, length, bits, group_size, per_channel);
}

}  // namespace hfquant::cpu

TORCH_LIBRARY_IMPL(hfquant, CPU, m) {
  m.impl("kv_quantize", &hfquant::cpu::kv_quantize_cpu);
  m.impl("kv_append", &hfquant::cpu::kv_append_cpu);
  m.impl("kv_dequantize", &hfquant::cpu::kv_dequantize_cpu);
  m.impl("kv_dequantize_into", &hfquant::cpu::kv_dequantize_into_cpu);
  m.impl("kv_dequantize_rotated_into", &hfquant::cpu::kv_dequantize_rotated_into_cpu);
}
