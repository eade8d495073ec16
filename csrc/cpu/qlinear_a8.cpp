// hfquant::qlinear_a8 on CPU: a 4-bit weight-only layer (the qlinear kernel layout) run with
// int8 activations, the way GGUF engines run Q4 x Q8: each row of x is quantized to int8 in
// blocks of 32 (scale d = max|x| / 127 per block, q = round-half-even(x / d), |q| <= 127), and
// integer dot products of the 4-bit codes v (0..15) with q give, per block b of row m,
//   D[b] = sum_{k in b} v[n][k] q[m][k]          (exact int32)
// and the layer
//   y[m][n] = sum_g s[n][g] * sum_{b in g} d[m][b] * D[b]  -  zs[n][g] * X[m][g]  (+ bias)
// with zs = sb[1] - 128 s (= s z, or -offset with float offsets; qlinear.h) and X[m][g] the
// group sum of the dequantized activations d * q. This is x' @ W^T for the quantized x'.
//
// Kernels: AVX-512 VNNI (vpdpbusd: 64 codes x 64 int8 per instruction), AVX2 (vpmaddubsw +
// vpmaddwd), portable C++; the int8 path setting (hfquant.settings.int8_path) chooses, as for
// the int8 GEMM. Weights of 8 bits are refused (their codes do not fit the unsigned operand
// with room to spare: use qlinear). A block of x holding NaN or inf makes its row's outputs NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#if defined(HFQUANT_X86)
#include <immintrin.h>
#endif

#include "cpu/aten_util.h"
#include "cpu/int8_gemm.h"
#include "cpu/qlinear.h"

namespace hfquant::cpu {

namespace {

constexpr int64_t kBlock = 32;  // activation block = one 4-bit unit of the layout

// Quantized activations of M rows: q [M][Kp] int8 (zero padded), d [M][Kp/32] block scales,
// X [M][G] group sums of d * q.
struct A8 {
  const int8_t* q;
  const float* d;
  const float* X;
  int64_t M;
};

template <typename T>
void quantize_rows(const T* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, int64_t gs, int64_t G, int8_t* q,
                   float* d, float* X) {
  const int64_t B = Kp / kBlock;
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / Kp), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* xr = x + m * ldx;
      int8_t* qr = q + m * Kp;
      float* dr = d + m * B;
      float* Xr = X + m * G;
      std::fill(Xr, Xr + G, 0.0f);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t k0 = b * kBlock, k1 = std::min(K, k0 + kBlock);
        float amax = 0.0f;
        bool finite = true;
        for (int64_t k = k0; k < k1; ++k) {
          const float v = static_cast<float>(xr[k]);
          finite = finite && std::isfinite(v);
          amax = std::max(amax, std::fabs(v));
        }
        // a block holding NaN or inf gets a NaN scale (codes 0): its rows' outputs are NaN
        const float scale = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
        int32_t sum = 0;
        for (int64_t k = k0; k < k0 + kBlock; ++k) {
          int32_t v = 0;
          if (k < k1 && scale > 0.0f) {
            const float r = std::nearbyint(static_cast<float>(xr[k]) / scale);
            v = static_cast<int32_t>(std::min(127.0f, std::max(-127.0f, r)));
          }
          qr[k] = static_cast<int8_t>(v);
          sum += v;
        }
        dr[b] = scale;
        Xr[k0 / gs] += scale * static_cast<float>(sum);
      }
    }
  });
}

// One tile (4 weight rows) against one activation row: out[r] = y of row r without bias.
// wt: the tile's units, sb: its scales [G][2][4], q/d/X: the row's codes, block scales, group sums.
struct TileRow {
  const uint8_t* wt;
  const float* sb;
  const int8_t* q;
  const float* d;
  const float* X;
  int64_t U, G, upg;
};
using TileRowFn = void (*)(const TileRow& w, float* out);

// y[m][4t + r] for tiles [t0, t1): a tile's units are read once per row m of x (they stay in L1).
template <TileRowFn F>
void a8_tiles(const PackedView& p, const A8& a, const OutView& o, int64_t t0, int64_t t1) {
  const int64_t U = p.Kp / kBlock;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t m = 0; m < a.M; ++m) {
      const TileRow w{p.w + t * U * 64, p.sb + t * p.G * 2 * kNR, a.q + m * p.Kp, a.d + m * U, a.X + m * p.G,
                      U, p.G, p.gs / kBlock};
      alignas(16) float out[kNR];
      F(w, out);
      for (int64_t r = 0; r < kNR && 4 * t + r < p.N; ++r) store_out(o, m, 4 * t + r, out[r]);
    }
  }
}

void tile_portable(const TileRow& w, float* out) {
  for (int64_t r = 0; r < kNR; ++r) {
    float acc = 0.0f;
    for (int64_t g = 0; g < w.G; ++g) {
      const float s = w.sb[g * 2 * kNR + r], zs = w.sb[g * 2 * kNR + kNR + r] - 128.0f * s;
      float gacc = 0.0f;
      for (int64_t u = g * w.upg; u < std::min(w.U, (g + 1) * w.upg); ++u) {
        const uint8_t* wr = w.wt + u * 64 + r * 16;
        const int8_t* qu = w.q + u * kBlock;
        int32_t dot = 0;
        for (int b = 0; b < 16; ++b) dot += int32_t(wr[b] & 15) * qu[b] + int32_t(wr[b] >> 4) * qu[16 + b];
        gacc += w.d[u] * static_cast<float>(dot);
      }
      acc += s * gacc - zs * w.X[g];
    }
    out[r] = acc;
  }
}

#if defined(HFQUANT_X86)
#define HQ_A8_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))

// [s0 s1 s2 s3] -> lanes: s0 x4 | s1 x4 | s2 x4 | s3 x4.
HQ_A8_AVX512 inline __m512 expand_rows512(const float* s4) {
  const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(s4)));
}

// The zero-point term of a group for the 4 rows: (sb[1] - 128 s) * X.
__attribute__((target("avx2,fma"))) inline __m128 group_corr(const float* sg, float X, __m128 corr) {
  const __m128 s4 = _mm_loadu_ps(sg), zs4 = _mm_sub_ps(_mm_loadu_ps(sg + kNR), _mm_mul_ps(_mm_set1_ps(128.0f), s4));
  return _mm_fmadd_ps(zs4, _mm_set1_ps(X), corr);
}

HQ_A8_AVX512 void tile_vnni512(const TileRow& w, float* out) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 acc = _mm512_setzero_ps();
  __m128 corr = _mm_setzero_ps();
  for (int64_t g = 0; g < w.G; ++g) {
    __m512 gacc = _mm512_setzero_ps();
    const int64_t u1 = std::min(w.U, (g + 1) * w.upg);
    for (int64_t u = g * w.upg; u < u1; ++u) {
      const __m512i v = _mm512_loadu_si512(w.wt + u * 64);
      const __m512i lo = _mm512_and_si512(v, nib);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + u * kBlock)));
      const __m512i xh =
          _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + u * kBlock + 16)));
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
      gacc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(w.d[u]), gacc);
    }
    acc = _mm512_fmadd_ps(gacc, expand_rows512(w.sb + g * 2 * kNR), acc);
    corr = group_corr(w.sb + g * 2 * kNR, w.X[g], corr);
  }
  // row r = the sum of the 4 floats of 128-bit lane r
  const __m128 a0 = _mm512_castps512_ps128(acc), a1 = _mm512_extractf32x4_ps(acc, 1);
  const __m128 a2 = _mm512_extractf32x4_ps(acc, 2), a3 = _mm512_extractf32x4_ps(acc, 3);
  _mm_store_ps(out, _mm_sub_ps(_mm_hadd_ps(_mm_hadd_ps(a0, a1), _mm_hadd_ps(a2, a3)), corr));
}

__attribute__((target("avx2,fma"))) void tile_avx2(const TileRow& w, float* out) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc01 = _mm256_setzero_ps(), acc23 = _mm256_setzero_ps();  // lanes: row 0 | row 1, row 2 | row 3
  __m128 corr = _mm_setzero_ps();
  for (int64_t g = 0; g < w.G; ++g) {
    __m256 g01 = _mm256_setzero_ps(), g23 = _mm256_setzero_ps();
    const int64_t u1 = std::min(w.U, (g + 1) * w.upg);
    for (int64_t u = g * w.upg; u < u1; ++u) {
      const __m256i xl =
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + u * kBlock)));
      const __m256i xh =
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + u * kBlock + 16)));
      const __m256 du = _mm256_set1_ps(w.d[u]);
      __m256* gh[2] = {&g01, &g23};
      for (int half = 0; half < 2; ++half) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.wt + u * 64 + 32 * half));
        const __m256i lo = _mm256_and_si256(v, nib);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        // |pair sums| <= 2 * 15 * 127: lo + hi fits int16
        const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
        *gh[half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones)), du, *gh[half]);
      }
    }
    const float* sg = w.sb + g * 2 * kNR;
    acc01 = _mm256_fmadd_ps(g01, _mm256_setr_ps(sg[0], sg[0], sg[0], sg[0], sg[1], sg[1], sg[1], sg[1]), acc01);
    acc23 = _mm256_fmadd_ps(g23, _mm256_setr_ps(sg[2], sg[2], sg[2], sg[2], sg[3], sg[3], sg[3], sg[3]), acc23);
    corr = group_corr(sg, w.X[g], corr);
  }
  const __m128 r01 = _mm_hadd_ps(_mm256_castps256_ps128(acc01), _mm256_extractf128_ps(acc01, 1));
  const __m128 r23 = _mm_hadd_ps(_mm256_castps256_ps128(acc23), _mm256_extractf128_ps(acc23, 1));
  _mm_store_ps(out, _mm_sub_ps(_mm_hadd_ps(r01, r23), corr));
}
#endif

using A8Kernel = void (*)(const PackedView&, const A8&, const OutView&, int64_t, int64_t);

A8Kernel a8_kernel() {
#if defined(HFQUANT_X86)
  switch (active_int8_path()) {
    case i8::Path::Vnni512: return a8_tiles<tile_vnni512>;
    case i8::Path::AvxVnni:
    case i8::Path::Avx2: return a8_tiles<tile_avx2>;
    default: break;
  }
#endif
  return a8_tiles<tile_portable>;
}

}  // namespace

// x            : float32/bfloat16/float16 [..., K]
// packed_weight, packed_scales: repack's outputs of a 4-bit [N, K] weight
// bias         : optional [N], any floating dtype
// returns      : x.dtype [..., N] = quantize_int8_blocks(x) @ W^T + bias
at::Tensor qlinear_a8_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                          const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                          int64_t out_features, int64_t in_features) {
  const char* op = "qlinear_a8";
  TORCH_CHECK(bits == 4, "hfquant::qlinear_a8: bits=", bits, " is not supported (4-bit weights only; use qlinear)");
  const int64_t N = out_features, K = in_features;
  const PackedGeometry geo = check_linear_call(op, x, packed_weight, packed_scales, bias, bits, group_size, N, K, "");
  const PackedView p{packed_weight.data_ptr<uint8_t>(), packed_scales.data_ptr<float>(), bits, N, K,
                     geo.Kp, geo.T, geo.G, geo.gs};
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  const at::Tensor x2d = x.reshape({-1, K});
  const int64_t M = x2d.size(0);
  if (M == 0) return at::empty(out_sizes, x.options());
  const at::Tensor xk = x2d.stride(1) == 1 ? x2d : x2d.contiguous();
  // q int8 [M][Kp], d float [M][Kp/32], X float [M][G] in one scratch buffer (64-byte aligned parts)
  const int64_t qbytes = round_up(M * geo.Kp, 64), dbytes = round_up(M * (geo.Kp / kBlock) * 4, 64);
  at::Tensor holder;
  uint8_t* buf = scratch(qbytes + dbytes + round_up(M * geo.G * 4, 64), holder);
  int8_t* q = reinterpret_cast<int8_t*>(buf);
  float* d = reinterpret_cast<float*>(buf + qbytes);
  float* X = reinterpret_cast<float*>(buf + qbytes + dbytes);
  dispatch_float(x.scalar_type(), op, "x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    quantize_rows<T>(xk.data_ptr<T>(), xk.stride(0), M, K, geo.Kp, geo.gs, geo.G, q, d, X);
  });
  at::Tensor b32;
  if (bias) b32 = bias->scalar_type() == at::kFloat ? bias->contiguous() : bias->to(at::kFloat);
  at::Tensor y = at::empty({M, N}, x.options());
  const OutView o{y.data_ptr(), dtype_of(x.scalar_type()), N, bias ? b32.data_ptr<float>() : nullptr};
  const A8 a{q, d, X, M};
  const A8Kernel kern = a8_kernel();
  // tasks of >= 8 tiles (32 rows), fewer when M is large
  const int64_t grain = std::max<int64_t>(1, 8 / std::max<int64_t>(1, M / 8));
  at::parallel_for(0, geo.T, grain, [&](int64_t t0, int64_t t1) { kern(p, a, o, t0, t1); });
  return y.reshape(out_sizes);
}

}  // namespace hfquant::cpu

TORCH_LIBRARY_IMPL(hfquant, CPU, m) { m.impl("qlinear_a8", &hfquant::cpu::qlinear_a8_cpu); }
