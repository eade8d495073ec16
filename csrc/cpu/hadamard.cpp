// Fast Walsh-Hadamard transform on CPU (online rotations: the quantized KV cache, activations).
//
// For each row x of the last dimension (length p, a power of two):
//   forward: y = H (s * x) / sqrt(p)
//   inverse: y = s * (H x) / sqrt(p)
// with H the Sylvester Hadamard matrix of order p (H[i][j] = (-1)^popcount(i & j), symmetric,
// H H = p I) and s an optional diagonal (normally random +-1 signs: then the inverse undoes the
// forward). Rows are computed in float32 whatever the input dtype, in log2(p) butterfly stages
// (a, b) -> (a + b, a - b) over pairs at distance 1, 2, 4, ... p/2, then the 1/sqrt(p) scale:
// hfquant.ref.hadamard_transform_ref does the same operations in the same order, so the
// float32 results agree bit for bit (the file is built without FMA contraction).
//
// With a mix M (float32 [m, m], orthonormal: the Paley factor of a rotation whose size n = m p
// is not a power of two) each row of length n is viewed as [m, p]: forward transforms the m
// sub-rows as above (signs over all n), then out[i] = sum_j M[i][j] v[j] (j = 0, 1, ... in
// order: a multiply, then an add per term); inverse first mixes with M^T, then transforms, then
// applies the signs. One pass per row: the online rotation of hfquant.algorithms.rotation.
//
// The butterfly loops are compiled three times (portable, AVX2, AVX-512 target clones) and the
// path is chosen at run time with the rest of the kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <utility>

#if defined(HFQUANT_X86)
#include <immintrin.h>
#endif
#include <vector>

#include "cpu/aten_util.h"
#include "cpu/cpu_features.h"
#include "cpu/hadamard.h"

namespace hfquant::cpu {
namespace {

constexpr int64_t kMaxLength = int64_t(1) << 20;

// In-place butterflies and scale of one float32 row of length p (a power of two): the stages at
// distances h0, 2 h0, ... p/2, then the scale (h0 = 1: the whole transform). Rows longer than
// the active path's block_max (below) take the row kernels built on it.
inline __attribute__((always_inline)) void fwht_stages_impl(float* v, int64_t p, int64_t h0, float scale) {
  for (int64_t h = h0; h < p; h *= 2) {
    for (int64_t i = 0; i < p; i += 2 * h) {
      float* a = v + i;
      float* b = v + i + h;
      for (int64_t j = 0; j < h; ++j) {
        const float x = a[j], y = b[j];
        a[j] = x + y;
        b[j] = x - y;
      }
    }
  }
  for (int64_t j = 0; j < p; ++j) v[j] *= scale;
}

inline __attribute__((always_inline)) void fwht_row_impl(float* v, int64_t p, float scale) {
  fwht_stages_impl(v, p, 1, scale);
}

// Rows up to kSoaMax long go kLanes at a time through a transposed buffer v[p][kLanes] (element
// j of row l at v[j * kLanes + l]): every stage then works on whole vectors of kLanes floats,
// the short stages (pairs at distance 1, 2, 4) included. Same operations per element, in the
// same order, as the row path.
constexpr int64_t kLanes = 16;
constexpr int64_t kSoaMax = 1024;

inline __attribute__((always_inline)) void fwht_block_impl(float* v, int64_t p, float scale) {
  for (int64_t h = 1; h < p; h *= 2) {
    for (int64_t i = 0; i < p; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        float* a = v + j * kLanes;
        float* b = v + (j + h) * kLanes;
        for (int64_t l = 0; l < kLanes; ++l) {
          const float x = a[l], y = b[l];
          a[l] = x + y;
          b[l] = x - y;
        }
      }
    }
  }
  for (int64_t j = 0; j < p * kLanes; ++j) v[j] *= scale;
}

// out[i] = sum_j M'[i][j] v[j] over the m sub-rows of length p (M' = M, or M^T if transpose):
// the first term a multiply, then multiply and add per term in j's order (no contraction).
inline __attribute__((always_inline)) void mix_impl(const float* v, float* out, const float* mix, int64_t m,
                                                     int64_t p, bool transpose) {
  for (int64_t i = 0; i < m; ++i) {
    float* o = out + i * p;
    const float c0 = transpose ? mix[i] : mix[i * m];
    for (int64_t k = 0; k < p; ++k) o[k] = c0 * v[k];
    for (int64_t j = 1; j < m; ++j) {
      const float c = transpose ? mix[j * m + i] : mix[i * m + j];
      const float* vj = v + j * p;
      for (int64_t k = 0; k < p; ++k) o[k] = o[k] + c * vj[k];
    }
  }
}

void fwht_row_portable(float* v, int64_t p, float scale) { fwht_row_impl(v, p, scale); }
void fwht_block_portable(float* v, int64_t p, float scale) { fwht_block_impl(v, p, scale); }
void mix_portable(const float* v, float* out, const float* mix, int64_t m, int64_t p, bool transpose) {
  mix_impl(v, out, mix, m, p, transpose);
}
#if defined(HFQUANT_X86)
// SIMD rows: the stages at distance h < W (W floats per register) inside each register, as
// t = the register with the lanes of each pair swapped, then x + t on the lower lane of a pair
// and t - x on the upper one (a + b and a - b, the row path's operations); the longer stages
// on whole registers. Rows shorter than W take the block path.
__attribute__((target("avx2,fma,f16c"))) void fwht_row_avx2(float* v, int64_t p, float scale) {
  if (p < 8) return fwht_row_impl(v, p, scale);
  const __m256i swap1 = _mm256_setr_epi32(1, 0, 3, 2, 5, 4, 7, 6);
  const __m256i swap2 = _mm256_setr_epi32(2, 3, 0, 1, 6, 7, 4, 5);
  const __m256i swap4 = _mm256_setr_epi32(4, 5, 6, 7, 0, 1, 2, 3);
  for (int64_t i = 0; i < p; i += 8) {
    __m256 x = _mm256_loadu_ps(v + i);
    __m256 t = _mm256_permutevar8x32_ps(x, swap1);
    x = _mm256_blend_ps(_mm256_add_ps(x, t), _mm256_sub_ps(t, x), 0xAA);
    t = _mm256_permutevar8x32_ps(x, swap2);
    x = _mm256_blend_ps(_mm256_add_ps(x, t), _mm256_sub_ps(t, x), 0xCC);
    t = _mm256_permutevar8x32_ps(x, swap4);
    x = _mm256_blend_ps(_mm256_add_ps(x, t), _mm256_sub_ps(t, x), 0xF0);
    _mm256_storeu_ps(v + i, x);
  }
  fwht_stages_impl(v, p, 8, scale);  // whole registers: the loops vectorize as they are
}
__attribute__((target("avx2,fma,f16c"))) void fwht_block_avx2(float* v, int64_t p, float scale) {
  fwht_block_impl(v, p, scale);
}
__attribute__((target("avx2,fma,f16c"))) void mix_avx2(const float* v, float* out, const float* mix, int64_t m,
                                                      int64_t p, bool transpose) {
  mix_impl(v, out, mix, m, p, transpose);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void fwht_row_avx512(float* v, int64_t p,
                                                                                                  float scale) {
  if (p < 16) return fwht_row_avx2(v, p, scale);
  const __m512i swap1 = _mm512_setr_epi32(1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  const __m512i swap2 = _mm512_setr_epi32(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  const __m512i swap4 = _mm512_setr_epi32(4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  const __m512i swap8 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < p; i += 16) {
    __m512 x = _mm512_loadu_ps(v + i);
    __m512 t = _mm512_permutexvar_ps(swap1, x);
    x = _mm512_mask_blend_ps(0xAAAA, _mm512_add_ps(x, t), _mm512_sub_ps(t, x));
    t = _mm512_permutexvar_ps(swap2, x);
    x = _mm512_mask_blend_ps(0xCCCC, _mm512_add_ps(x, t), _mm512_sub_ps(t, x));
    t = _mm512_permutexvar_ps(swap4, x);
    x = _mm512_mask_blend_ps(0xF0F0, _mm512_add_ps(x, t), _mm512_sub_ps(t, x));
    t = _mm512_permutexvar_ps(swap8, x);
    x = _mm512_mask_blend_ps(0xFF00, _mm512_add_ps(x, t), _mm512_sub_ps(t, x));
    _mm512_storeu_ps(v + i, x);
  }
  fwht_stages_impl(v, p, 16, scale);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void fwht_block_avx512(float* v,
                                                                                                    int64_t p,
                                                                                                    float scale) {
  fwht_block_impl(v, p, scale);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void mix_avx512(
    const float* v, float* out, const float* mix, int64_t m, int64_t p, bool transpose) {
  mix_impl(v, out, mix, m, p, transpose);
}
#endif

using RowFn = void (*)(float*, int64_t, float);
using MixFn = void (*)(const float*, float*, const float*, int64_t, int64_t, bool);

// The active path's kernels: a row kernel, a block kernel, the longest row the block kernel
// takes (rows up to it go through blocks: the SIMD row kernels need a register's width) and
// the mix of sub-rows.
struct Kernels {
  RowFn row, block;
  int64_t block_max;
  MixFn mix;
};

Kernels kernels() {
#if defined(HFQUANT_X86)
  switch (active_isa()) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return {fwht_row_avx512, fwht_block_avx512, 8, mix_avx512};
    case Isa::Avx2: return {fwht_row_avx2, fwht_block_avx2, 4, mix_avx2};
    default: break;
  }
#endif
  return {fwht_row_portable, fwht_block_portable, kSoaMax, mix_portable};
}

// Walks the rows of a tensor (the leading dimensions in order, any strides): `offset` is the
// current row's first element; `seek` positions it once per task, `next` steps without divisions.
struct RowCursor {
  std::vector<int64_t> sizes, strides, index;  // leading dims only
  int64_t offset = 0;
  explicit RowCursor(const at::Tensor& t) {
    for (int64_t d = 0; d + 1 < t.dim(); ++d) {
      sizes.push_back(t.size(d));
      strides.push_back(t.stride(d));
    }
    index.assign(sizes.size(), 0);
  }
  void seek(int64_t r) {
    offset = 0;
    for (int64_t d = int64_t(sizes.size()) - 1; d >= 0; --d) {
      index[d] = r % sizes[d];
      offset += index[d] * strides[d];
      r /= sizes[d];
    }
  }
  void next() {
    for (int64_t d = int64_t(sizes.size()) - 1; d >= 0; --d) {
      offset += strides[d];
      if (++index[d] < sizes[d]) return;
      offset -= index[d] * strides[d];
      index[d] = 0;
    }
  }
};

void check_args(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& signs,
                const c10::optional<at::Tensor>& mix) {
  TORCH_CHECK(x.device().is_cpu(), "hfquant::", op, ": x is on ", x.device(), " but this is the CPU kernel");
  TORCH_CHECK(x.dim() >= 1, "hfquant::", op, ": x must have at least one dimension (the transformed one)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "hfquant::", op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t n = x.size(-1);
  int64_t m = 1;
  if (mix.has_value()) {
    const at::Tensor& t = *mix;
    TORCH_CHECK(t.device() == x.device(), "hfquant::", op, ": mix is on ", t.device(), ", x on ", x.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == t.size(1) && t.size(0) >= 1,
                "hfquant::", op, ": mix must be a square float32 matrix [m, m], got ", t.scalar_type(), " ",
                t.sizes());
    m = t.size(0);
    TORCH_CHECK(n % m == 0, "hfquant::", op, ": the last dimension of x (", n, ") is not a multiple of mix's order (",
                m, ")");
  }
  const int64_t p = n / m;
  TORCH_CHECK(p >= 1 && p <= kMaxLength && (p & (p - 1)) == 0, "hfquant::", op, ": the last dimension of x (",
              n, mix.has_value() ? ") divided by mix's order must be" : ") must be",
              " a power of two between 1 and ", kMaxLength,
              " (other sizes: hfquant.algorithms.rotation.HadamardRotation)");
  if (signs.has_value()) {
    const at::Tensor& s = *signs;
    TORCH_CHECK(s.device() == x.device(), "hfquant::", op, ": signs is on ", s.device(), ", x on ", x.device());
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == n, "hfquant::", op,
                ": signs must be a float32 vector of ", n, " values (the last dimension of x), got ",
                s.scalar_type(), " ", s.sizes());
  }
}

// Transforms the rows of src into dst (same shape; may be the same tensor; last dims contiguous).
void transform(const at::Tensor& src, const at::Tensor& dst, const c10::optional<at::Tensor>& signs, bool inverse,
               const c10::optional<at::Tensor>& mix) {
  const int64_t n = src.size(-1);
  const int64_t rows = n ? src.numel() / n : 0;
  if (rows == 0) return;
  const at::Tensor sc = signs.has_value() ? signs->contiguous() : at::Tensor();
  const float* sp = signs.has_value() ? sc.data_ptr<float>() : nullptr;
  const at::Tensor mc = mix.has_value() ? mix->contiguous() : at::Tensor();
  const float* mp = mix.has_value() ? mc.data_ptr<float>() : nullptr;
  const int64_t m = mix.has_value() ? mc.size(0) : 1;
  const int64_t p = n / m;
  const float scale = 1.0f / std::sqrt(float(p));
  const Kernels kern = kernels();
  dispatch_float(src.scalar_type(), "hadamard_transform", "x", [&](auto* tag) {
    using X = std::remove_pointer_t<decltype(tag)>;
    const X* xp = src.data_ptr<X>();
    X* yp = dst.data_ptr<X>();
    auto load = [&](const X* in, float* to, int64_t stride) {  // to[j * stride] = (signs *) x[j]
      if (sp != nullptr && !inverse)
        for (int64_t j = 0; j < n; ++j) to[j * stride] = static_cast<float>(in[j]) * sp[j];
      else
        for (int64_t j = 0; j < n; ++j) to[j * stride] = static_cast<float>(in[j]);
    };
    auto store = [&](const float* from, X* out, int64_t stride) {
      if (sp != nullptr && inverse)
        for (int64_t j = 0; j < n; ++j) out[j] = static_cast<X>(from[j * stride] * sp[j]);
      else
        for (int64_t j = 0; j < n; ++j) out[j] = static_cast<X>(from[j * stride]);
    };
    if (mp != nullptr) {  // rows of m sub-rows: transform each, mix them (the inverse: the other way round)
      const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (n * m));
      at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        std::vector<float> buf(n), mixed(n);
        RowCursor si(src), di(dst);
        si.seek(r0);
        di.seek(r0);
        for (int64_t r = r0; r < r1; ++r, si.next(), di.next()) {
          load(xp + si.offset, buf.data(), 1);
          if (!inverse) {
            for (int64_t i = 0; i < m; ++i) kern.row(buf.data() + i * p, p, scale);
            kern.mix(buf.data(), mixed.data(), mp, m, p, false);
          } else {
            kern.mix(buf.data(), mixed.data(), mp, m, p, true);
            for (int64_t i = 0; i < m; ++i) kern.row(mixed.data() + i * p, p, scale);
          }
          store(mixed.data(), yp + di.offset, 1);
        }
      });
      return;
    }
    if (p <= kern.block_max) {
      const int64_t blocks = (rows + kLanes - 1) / kLanes;
      const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / (p * kLanes));
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
        std::vector<float> buf(p * kLanes, 0.0f);
        RowCursor si(src), di(dst);
        si.seek(b0 * kLanes);
        di.seek(b0 * kLanes);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r0 = b * kLanes, nr = std::min(kLanes, rows - r0);
          for (int64_t l = 0; l < nr; ++l, si.next()) load(xp + si.offset, buf.data() + l, kLanes);
          for (int64_t l = nr; l < kLanes; ++l)
            for (int64_t j = 0; j < p; ++j) buf[j * kLanes + l] = 0.0f;
          kern.block(buf.data(), p, scale);
          for (int64_t l = 0; l < nr; ++l, di.next()) store(buf.data() + l, yp + di.offset, kLanes);
        }
      });
      return;
    }
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / p);
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(p);
      RowCursor si(src), di(dst);
      si.seek(r0);
      di.seek(r0);
      for (int64_t r = r0; r < r1; ++r, si.next(), di.next()) {
        load(xp + si.offset, buf.data(), 1);
        kern.row(buf.data(), p, scale);
        store(buf.data(), yp + di.offset, 1);
      }
    });
  });
}

}  // namespace

FwhtRowFn fwht_row_kernel() { return kernels().row; }

at::Tensor hadamard_transform_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& signs, bool inverse,
                                  const c10::optional<at::Tensor>& mix) {
  check_args("hadamard_transform", x, signs, mix);
  const at::Tensor src = x.stride(-1) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  transform(src, y, signs, inverse, mix);
  return y;
}

void hadamard_transform_inplace_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& signs, bool inverse,
                                    const c10::optional<at::Tensor>& mix) {
  check_args("hadamard_transform_inplace", x, signs, mix);
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, "hfquant::hadamard_transform_inplace: the last dimension of x must be contiguous "
              "(stride 1), got stride ", x.stride(-1));
  transform(x, x, signs, inverse, mix);
}

}  // namespace hfquant::cpu

TORCH_LIBRARY_IMPL(hfquant, CPU, m) {
  m.impl("hadamard_transform", &hfquant::cpu::hadamard_transform_cpu);
  m.impl("hadamard_transform_inplace", &hfquant::cpu::hadamard_transform_inplace_cpu);
}
