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
#include <cstring>
#include <type_traits>
#include <limits>
#include <utility>

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

// Row m of x quantized (quantize_rows below): block b of 32 values (zero padded past K) gets
// d = max|x| / 127 and codes q = round-half-even(x / d) clamped to +-127 (0 when d is 0 or NaN).
template <typename T>
void quantize_row_portable(const T* xr, int64_t K, int64_t Kp, int64_t gs, int64_t G, int8_t* qr, float* dr,
                           float* Xr) {
  std::fill(Xr, Xr + G, 0.0f);
  for (int64_t b = 0; b < Kp / kBlock; ++b) {
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

#if defined(HFQUANT_X86)
// The same with AVX-512 (F/BW/DQ): the same IEEE division and round-half-even per value, so the
// codes and scales are bit for bit those of the portable loop.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void quantize_row_avx512(
    const T* xr, int64_t K, int64_t Kp, int64_t gs, int64_t G, int8_t* qr, float* dr, float* Xr) {
  std::fill(Xr, Xr + G, 0.0f);
  const __m512 lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f);
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t b = 0; b < Kp / kBlock; ++b) {
    const int64_t k0 = b * kBlock;
    __m512 v[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t n = std::clamp<int64_t>(K - (k0 + 16 * h), 0, 16);
      const __mmask16 m = static_cast<__mmask16>((uint32_t(1) << n) - 1);
      if constexpr (std::is_same_v<T, float>) {
        v[h] = _mm512_maskz_loadu_ps(m, xr + k0 + 16 * h);
      } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
        const __m256i raw = _mm256_maskz_loadu_epi16(m, xr + k0 + 16 * h);
        v[h] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      } else {
        v[h] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, xr + k0 + 16 * h));
      }
    }
    // NaN (quiet or signalling) or +-inf anywhere in the block
    const bool finite = (_mm512_fpclass_ps_mask(v[0], 0x99) | _mm512_fpclass_ps_mask(v[1], 0x99)) == 0;
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v[0], absmask), _mm512_and_ps(v[1], absmask)));
    const float scale = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
    int32_t sum = 0;
    if (scale > 0.0f) {
      const __m512 sv = _mm512_set1_ps(scale);
      __m512i c[2];
      for (int h = 0; h < 2; ++h) {
        const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v[h], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        c[h] = _mm512_cvtps_epi32(_mm512_min_ps(lim, _mm512_max_ps(nlim, r)));
      }
      sum = _mm512_reduce_add_epi32(_mm512_add_epi32(c[0], c[1]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k0), _mm512_cvtepi32_epi8(c[0]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k0 + 16), _mm512_cvtepi32_epi8(c[1]));
    } else {
      std::memset(qr + k0, 0, kBlock);
    }
    dr[b] = scale;
    Xr[k0 / gs] += scale * static_cast<float>(sum);
  }
}
#endif

// Rows m < M of q, d, X from rows src[m] of x (row m when src is null).
template <typename T>
void quantize_rows(const T* x, int64_t ldx, const int64_t* src, int64_t M, int64_t K, int64_t Kp, int64_t gs,
                   int64_t G, int8_t* q, float* d, float* X, bool avx512) {
  const int64_t B = Kp / kBlock;
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / Kp), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* xr = x + (src ? src[m] : m) * ldx;
#if defined(HFQUANT_X86)
      if (avx512) {
        quantize_row_avx512<T>(xr, K, Kp, gs, G, q + m * Kp, d + m * B, X + m * G);
        continue;
      }
#endif
      quantize_row_portable<T>(xr, K, Kp, gs, G, q + m * Kp, d + m * B, X + m * G);
    }
  });
}

// One tile (4 weight rows) against rows [m0, m0 + MB) of x; out[j][r] = y[m0 + j][4t + r] without
// bias. wt: the tile's units, sb: its scales [G][2][4]; the rows' codes, block scales and group
// sums are read from A8 at row m. Every kernel computes a row by the same sequence of float
// operations whatever MB it runs under, so a row's outputs do not depend on the rows beside it.
struct Tile {
  const uint8_t* wt;
  const float* sb;
  int64_t Kp, U, G, upg;
};

inline const int8_t* q_at(const A8& a, const Tile& w, int64_t m) { return a.q + m * w.Kp; }
inline const float* d_at(const A8& a, const Tile& w, int64_t m) { return a.d + m * w.U; }
inline const float* X_at(const A8& a, const Tile& w, int64_t m) { return a.X + m * w.G; }

struct PortableRows {
  static constexpr int kMaxRows = 1;
  template <int MB>
  static void run(const Tile& w, const A8& a, int64_t m0, float (*out)[kNR]) {
    for (int j = 0; j < MB; ++j) {
      const int8_t* q = q_at(a, w, m0 + j);
      const float *d = d_at(a, w, m0 + j), *X = X_at(a, w, m0 + j);
      for (int64_t r = 0; r < kNR; ++r) {
        float acc = 0.0f;
        for (int64_t g = 0; g < w.G; ++g) {
          const float s = w.sb[g * 2 * kNR + r], zs = w.sb[g * 2 * kNR + kNR + r] - 128.0f * s;
          float gacc = 0.0f;
          for (int64_t u = g * w.upg; u < std::min(w.U, (g + 1) * w.upg); ++u) {
            const uint8_t* wr = w.wt + u * 64 + r * 16;
            const int8_t* qu = q + u * kBlock;
            int32_t dot = 0;
            for (int b = 0; b < 16; ++b) dot += int32_t(wr[b] & 15) * qu[b] + int32_t(wr[b] >> 4) * qu[16 + b];
            gacc += d[u] * static_cast<float>(dot);
          }
          acc += s * gacc - zs * X[g];
        }
        out[j][r] = acc;
      }
    }
  }
};

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

// AVX-512 VNNI: a unit's 64 bytes are split into nibbles once and meet the 32 codes of each of
// the MB rows in two vpdpbusd; MB independent accumulator chains.
struct Vnni512Rows {
  static constexpr int kMaxRows = 8;
  template <int MB>
  HQ_A8_AVX512 static void run(const Tile& w, const A8& a, int64_t m0, float (*out)[kNR]) {
    const __m512i nib = _mm512_set1_epi8(0x0F);
    const int8_t* q[MB];
    const float* d[MB];
    __m512 acc[MB];
    __m128 corr[MB];
    for (int j = 0; j < MB; ++j) {
      q[j] = q_at(a, w, m0 + j);
      d[j] = d_at(a, w, m0 + j);
      acc[j] = _mm512_setzero_ps();
      corr[j] = _mm_setzero_ps();
    }
    for (int64_t g = 0; g < w.G; ++g) {
      __m512 gacc[MB];
      for (int j = 0; j < MB; ++j) gacc[j] = _mm512_setzero_ps();
      const int64_t u1 = std::min(w.U, (g + 1) * w.upg);
      for (int64_t u = g * w.upg; u < u1; ++u) {
        const __m512i v = _mm512_loadu_si512(w.wt + u * 64);
        const __m512i lo = _mm512_and_si512(v, nib);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
#pragma GCC unroll 8
        for (int j = 0; j < MB; ++j) {
          const __m128i* qu = reinterpret_cast<const __m128i*>(q[j] + u * kBlock);
          const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128(qu));
          const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128(qu + 1));
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
          gacc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(d[j][u]), gacc[j]);
        }
      }
      const __m512 s = expand_rows512(w.sb + g * 2 * kNR);
      for (int j = 0; j < MB; ++j) {
        acc[j] = _mm512_fmadd_ps(gacc[j], s, acc[j]);
        corr[j] = group_corr(w.sb + g * 2 * kNR, X_at(a, w, m0 + j)[g], corr[j]);
      }
    }
    // row r = the sum of the 4 floats of 128-bit lane r
    for (int j = 0; j < MB; ++j) {
      const __m128 a0 = _mm512_castps512_ps128(acc[j]), a1 = _mm512_extractf32x4_ps(acc[j], 1);
      const __m128 a2 = _mm512_extractf32x4_ps(acc[j], 2), a3 = _mm512_extractf32x4_ps(acc[j], 3);
      _mm_storeu_ps(out[j], _mm_sub_ps(_mm_hadd_ps(_mm_hadd_ps(a0, a1), _mm_hadd_ps(a2, a3)), corr[j]));
    }
  }
};

// AVX2: vpmaddubsw + vpmaddwd per half unit (rows 0-1, rows 2-3); MB rows share the nibbles.
struct Avx2Rows {
  static constexpr int kMaxRows = 2;
  template <int MB>
  __attribute__((target("avx2,fma"))) static void run(const Tile& w, const A8& a, int64_t m0, float (*out)[kNR]) {
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[MB][2];  // lanes: row 0 | row 1, row 2 | row 3
    __m128 corr[MB];
    for (int j = 0; j < MB; ++j) {
      acc[j][0] = acc[j][1] = _mm256_setzero_ps();
      corr[j] = _mm_setzero_ps();
    }
    for (int64_t g = 0; g < w.G; ++g) {
      __m256 gacc[MB][2];
      for (int j = 0; j < MB; ++j) gacc[j][0] = gacc[j][1] = _mm256_setzero_ps();
      const int64_t u1 = std::min(w.U, (g + 1) * w.upg);
      for (int64_t u = g * w.upg; u < u1; ++u) {
        __m256i lo[2], hi[2];
        for (int half = 0; half < 2; ++half) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.wt + u * 64 + 32 * half));
          lo[half] = _mm256_and_si256(v, nib);
          hi[half] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        }
        for (int j = 0; j < MB; ++j) {
          const __m128i* qu = reinterpret_cast<const __m128i*>(q_at(a, w, m0 + j) + u * kBlock);
          const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128(qu));
          const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(qu + 1));
          const __m256 du = _mm256_set1_ps(d_at(a, w, m0 + j)[u]);
          for (int half = 0; half < 2; ++half) {
            // |pair sums| <= 2 * 15 * 127: lo + hi fits int16
            const __m256i s16 =
                _mm256_add_epi16(_mm256_maddubs_epi16(lo[half], xl), _mm256_maddubs_epi16(hi[half], xh));
            gacc[j][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones)), du, gacc[j][half]);
          }
        }
      }
      const float* sg = w.sb + g * 2 * kNR;
      const __m256 s01 = _mm256_setr_ps(sg[0], sg[0], sg[0], sg[0], sg[1], sg[1], sg[1], sg[1]);
      const __m256 s23 = _mm256_setr_ps(sg[2], sg[2], sg[2], sg[2], sg[3], sg[3], sg[3], sg[3]);
      for (int j = 0; j < MB; ++j) {
        acc[j][0] = _mm256_fmadd_ps(gacc[j][0], s01, acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(gacc[j][1], s23, acc[j][1]);
        corr[j] = group_corr(sg, X_at(a, w, m0 + j)[g], corr[j]);
      }
    }
    for (int j = 0; j < MB; ++j) {
      const __m128 r01 = _mm_hadd_ps(_mm256_castps256_ps128(acc[j][0]), _mm256_extractf128_ps(acc[j][0], 1));
      const __m128 r23 = _mm_hadd_ps(_mm256_castps256_ps128(acc[j][1]), _mm256_extractf128_ps(acc[j][1], 1));
      _mm_storeu_ps(out[j], _mm_sub_ps(_mm_hadd_ps(r01, r23), corr[j]));
    }
  }
};
#endif

// y[m][4t + r] for tiles [t0, t1) and every row m: the tiles in chunks of about 128 KiB of
// weights (they stay in L2 while every block of K::kMaxRows rows of x runs over them); within
// a chunk, a block's codes stay in L1 while the chunk's tiles pass.
template <class K>
void a8_tiles(const PackedView& p, const A8& a, const OutView& o, int64_t t0, int64_t t1) {
  constexpr int MB = K::kMaxRows;
  using RowsFn = void (*)(const Tile&, const A8&, int64_t, float (*)[kNR]);
  RowsFn fns[MB + 1] = {nullptr};
  [&]<int... I>(std::integer_sequence<int, I...>) { ((fns[I + 1] = &K::template run<I + 1>), ...); }
  (std::make_integer_sequence<int, MB>{});
  const int64_t U = p.Kp / kBlock;
  const int64_t chunk = std::max<int64_t>(1, (int64_t(128) << 10) / (U * 64));
  for (int64_t c0 = t0; c0 < t1; c0 += chunk) {
    const int64_t c1 = std::min(t1, c0 + chunk);
    for (int64_t m0 = 0; m0 < a.M; m0 += MB) {
      const int64_t mb = std::min<int64_t>(MB, a.M - m0);
      for (int64_t t = c0; t < c1; ++t) {
        const Tile w{p.w + t * U * 64, p.sb + t * p.G * 2 * kNR, p.Kp, U, p.G, p.gs / kBlock};
        alignas(16) float out[MB][kNR];
        fns[mb](w, a, m0, out);
        for (int64_t j = 0; j < mb; ++j)
          for (int64_t r = 0; r < kNR && 4 * t + r < p.N; ++r) store_out(o, m0 + j, 4 * t + r, out[j][r]);
      }
    }
  }
}

using A8Kernel = void (*)(const PackedView&, const A8&, const OutView&, int64_t, int64_t);

A8Kernel a8_kernel() {
#if defined(HFQUANT_X86)
  switch (active_int8_path()) {
    case i8::Path::Vnni512: return a8_tiles<Vnni512Rows>;
    case i8::Path::AvxVnni:
    case i8::Path::Avx2: return a8_tiles<Avx2Rows>;
    default: break;
  }
#endif
  return a8_tiles<PortableRows>;
}

// The int8 activations of rows src[m] (m < M; row m when src is null) of a 2-D x with unit
// column stride: q, d, X in one scratch buffer kept alive by `holder`.
A8 quantize_activations(const char* op, const at::Tensor& xk, const int64_t* src, int64_t M, int64_t K,
                        const PackedGeometry& geo, at::Tensor& holder) {
  // q int8 [M][Kp], d float [M][Kp/32], X float [M][G] (64-byte aligned parts)
  const int64_t qbytes = round_up(M * geo.Kp, 64), dbytes = round_up(M * (geo.Kp / kBlock) * 4, 64);
  uint8_t* buf = scratch(qbytes + dbytes + round_up(M * geo.G * 4, 64), holder);
  int8_t* q = reinterpret_cast<int8_t*>(buf);
  float* d = reinterpret_cast<float*>(buf + qbytes);
  float* X = reinterpret_cast<float*>(buf + qbytes + dbytes);
  // the AVX-512 quantization with the AVX-512 VNNI kernels (the int8 path setting forces either)
#if defined(HFQUANT_X86)
  const bool avx512 = active_int8_path() == i8::Path::Vnni512;
#else
  const bool avx512 = false;
#endif
  dispatch_float(xk.scalar_type(), op, "x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    quantize_rows<T>(xk.data_ptr<T>(), xk.stride(0), src, M, K, geo.Kp, geo.gs, geo.G, q, d, X, avx512);
  });
  return A8{q, d, X, M};
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
  at::Tensor holder;
  const A8 a = quantize_activations(op, xk, nullptr, M, K, geo, holder);
  at::Tensor b32;
  if (bias) b32 = bias->scalar_type() == at::kFloat ? bias->contiguous() : bias->to(at::kFloat);
  at::Tensor y = at::empty({M, N}, x.options());
  const OutView o{y.data_ptr(), dtype_of(x.scalar_type()), N, bias ? b32.data_ptr<float>() : nullptr};
  const A8Kernel kern = a8_kernel();
  // tasks of >= 8 tiles (32 rows), fewer when M is large
  const int64_t grain = std::max<int64_t>(1, 8 / std::max<int64_t>(1, M / 8));
  at::parallel_for(0, geo.T, grain, [&](int64_t t0, int64_t t1) { kern(p, a, o, t0, t1); });
  return y.reshape(out_sizes);
}

// Routed experts with int8 activations: qlinear_routed's arguments (4-bit experts only); each
// row r quantized as qlinear_a8 quantizes it, then the rows of each expert present run the
// qlinear_a8 kernels against that expert's weights, so every row comes out bit for bit as
// qlinear_a8 of that row alone with packed_weight[e] gives it. The rows are quantized once, in
// expert order; one parallel region runs (expert, tile range) items.
at::Tensor qlinear_routed_a8_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                                 const at::Tensor& expert_ids, const std::optional<at::Tensor>& bias, int64_t bits,
                                 int64_t group_size, int64_t out_features, int64_t in_features) {
  const char* op = "qlinear_routed_a8";
  TORCH_CHECK(bits == 4, "hfquant::qlinear_routed_a8: bits=", bits,
              " is not supported (4-bit experts only; use qlinear_routed)");
  const RoutedCall call = check_routed_call(op, x, packed_weight, packed_scales, expert_ids, bias, bits, group_size,
                                            out_features, in_features);
  const int64_t N = out_features, K = in_features, R = x.size(0), E = call.E;
  const PackedGeometry& geo = call.geo;
  at::Tensor y = at::empty({R, N}, x.options());
  if (R == 0) return y;
  const at::Tensor xk = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t* perm = call.perm.data_ptr<int64_t>();
  at::Tensor holder;
  const A8 a = quantize_activations(op, xk, perm, R, K, geo, holder);  // sorted row i = row perm[i] of x
  at::Tensor b32;
  if (bias) b32 = bias->scalar_type() == at::kFloat ? bias->contiguous() : bias->to(at::kFloat).contiguous();
  at::Tensor ys = at::empty({R, N}, x.options());  // outputs in expert order
  uint8_t* ysp = static_cast<uint8_t*>(ys.data_ptr());
  const int64_t yes = ys.element_size(), U = geo.Kp / kBlock;
  const uint8_t* pw = packed_weight.data_ptr<uint8_t>();
  const float* psb = packed_scales.data_ptr<float>();
  const int64_t w_stride = geo.T * U * 64, sb_stride = geo.T * geo.G * 2 * kNR;
  // one item per (expert present, range of `step` tiles); step gives each item >= ~64 tile-rows
  struct Item {
    int64_t e, t0, t1;
  };
  std::vector<Item> items;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = call.start[e + 1] - call.start[e];
    if (c == 0) continue;
    const int64_t step = std::max<int64_t>(8, 64 / c);
    for (int64_t t = 0; t < geo.T; t += step) items.push_back({e, t, std::min(geo.T, t + step)});
  }
  const A8Kernel kern = a8_kernel();
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      const int64_t r0 = call.start[it.e], c = call.start[it.e + 1] - r0;
      const PackedView p{pw + it.e * w_stride, psb + it.e * sb_stride, 4, N, K, geo.Kp, geo.T, geo.G, geo.gs};
      const A8 ae{a.q + r0 * geo.Kp, a.d + r0 * U, a.X + r0 * geo.G, c};
      const OutView o{ysp + r0 * N * yes, dtype_of(x.scalar_type()), N, bias ? b32.data_ptr<float>() + it.e * N : nullptr};
      kern(p, ae, o, it.t0, it.t1);
    }
  });
  scatter_rows(static_cast<uint8_t*>(y.data_ptr()), ysp, perm, R, N * yes);
  return y;
}

}  // namespace hfquant::cpu

TORCH_LIBRARY_IMPL(hfquant, CPU, m) {
  m.impl("qlinear_a8", &hfquant::cpu::qlinear_a8_cpu);
  m.impl("qlinear_routed_a8", &hfquant::cpu::qlinear_routed_a8_cpu);
}
