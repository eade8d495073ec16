// Internal interface between the qlinear dispatcher (qlinear.cpp) and the per-ISA
// kernels (qlinear_portable.cpp, qlinear_avx2.cpp, qlinear_avx512.cpp).
//
// Kernel layout (made by hfquant::repack, never saved; docs/formats.md):
//   NR = 4 output rows form a tile; N is padded to Np = T*4 with zero rows.
//   K is padded to Kp = round_up(K, 32); padded weights are 0, padded x is 0.
//   4-bit: w[T][Kp/32][4][16] bytes, byte b of row r in unit u holds
//          v(4t+r, 32u+b) in the low nibble and v(4t+r, 32u+16+b) in the high nibble.
//   8-bit: w[T][Kp/16][4][16] bytes, byte b of row r in unit u holds v(4t+r, 16u+b).
//   v is the unsigned stored code: 4-bit 0..15, 8-bit 0..255 (symmetric int8 + 128).
//   sb[T][G][2][4] float32: sb[t][g][0][r] = scale s, sb[t][g][1][r] = s * (z + OFF),
//   OFF = 128 for 4-bit (the kernels may read a 4-bit code as the value 128 + v, which
//   is the bf16 bit pattern 0x4300 | v), 0 for 8-bit; z = zero point (8 / 128 symmetric).
//   With float offsets m (weight = v * s + m) the second value is s * OFF - m instead.
// Semantics: y[m,n] = sum_g ( s * sum_{k in g} (v + OFF) x[m,k]  -  s(z+OFF) * X[m,g] )
//            where X[m,g] = sum_{k in g} x[m,k];  this equals sum_k (v - z) s x[m,k].
#pragma once
#include <cstdint>

namespace hfquant::cpu {

constexpr int64_t kNR = 4;      // rows per tile
constexpr int64_t kKAlign = 32;  // K padding

// Element types of activations, outputs and dequantized weights.
enum class DType : int8_t { F32 = 0, BF16 = 1, F16 = 2 };

struct PackedView {
  const uint8_t* w;
  const float* sb;
  int64_t bits;
  int64_t N, K, Kp;  // true sizes and padded K
  int64_t T;         // tiles (Np / 4)
  int64_t G;         // groups per row
  int64_t gs;        // group length in k (Kp when per-channel); multiple of 32
};

// Activations prepared once per call by the dispatcher (prepare_* below).
//   x   : fp32 [M][Kp], zero padded          (all paths)
//   xs  : fp32 [M][G] group sums X[m,g], computed from exactly the values the kernel
//         multiplies with (hi + lo below on the bf16 path, else x)
//   xhi, xlo : bf16 bit patterns [M][Kp]; only for the avx512bf16 4-bit path;
//         x = hi + lo (+ a residual below 2^-16 |x|); has_lo false when x was bf16.
struct ActView {
  const float* x;
  const float* xs;
  const uint16_t* xhi;
  const uint16_t* xlo;
  bool has_lo;
  int64_t M;
};

// Where a kernel stores y[m][n] (+ bias[n]), converted to dt; row stride ldy elements.
struct OutView {
  void* y;
  DType dt;
  int64_t ldy;
  const float* bias;  // fp32 [N] or nullptr
};

// Computes y[m][4t + r] for tiles t in [t0, t1) and all m < a.M.
// Rows >= N of the last tile must not be written.
using GemvKernel = void (*)(const PackedView& p, const ActView& a, const OutView& o, int64_t t0, int64_t t1);

void gemv_portable(const PackedView& p, const ActView& a, const OutView& o, int64_t t0, int64_t t1);
void gemv_avx2(const PackedView& p, const ActView& a, const OutView& o, int64_t t0, int64_t t1);
void gemv_avx512(const PackedView& p, const ActView& a, const OutView& o, int64_t t0, int64_t t1);
void gemv_avx512bf16(const PackedView& p, const ActView& a, const OutView& o, int64_t t0, int64_t t1);

// The qlinear dispatcher hands a GemvKernel tile ranges that start at multiples of this
// (the M = 1 kernels group 4 tiles from the start of their range): its result does not
// depend on the thread count, and an op calling the kernels the same way gets it bit for bit.
constexpr int64_t kGemvTileStep = 4;

// Fills the ActView buffers from M rows of x (dtype xt, k contiguous, row stride ldx
// elements): xo fp32 [M][Kp] zero padded, xs [M][G]; with split (avx512bf16 only) also
// xhi/xlo [M][Kp] (xlo all zero when xt is bf16).
using PrepareFn = void (*)(const void* x, DType xt, int64_t ldx, int64_t M, const PackedView& p, bool split,
                           float* xo, float* xs, uint16_t* xhi, uint16_t* xlo);
void prepare_portable(const void* x, DType xt, int64_t ldx, int64_t M, const PackedView& p, bool split,
                      float* xo, float* xs, uint16_t* xhi, uint16_t* xlo);
void prepare_avx2(const void* x, DType xt, int64_t ldx, int64_t M, const PackedView& p, bool split, float* xo,
                  float* xs, uint16_t* xhi, uint16_t* xlo);
void prepare_avx512(const void* x, DType xt, int64_t ldx, int64_t M, const PackedView& p, bool split,
                    float* xo, float* xs, uint16_t* xhi, uint16_t* xlo);

// What qlinear (qlinear.cpp) does for x of dtype xt and an [N, K] weight (Kp = padded K) on
// the active ISA, for ops built on its kernels (qlinear_routed.cpp): calls of M <= max_m rows
// take the GEMV kernel `gemv` on activations made by `prepare` (split: with the bf16 hi/lo
// halves), larger M another path.
struct GemvPlan {
  GemvKernel gemv;
  PrepareFn prepare;
  bool split;
  int64_t max_m;
};
GemvPlan qlinear_gemv_plan(DType xt, int64_t bits, int64_t N, int64_t Kp);

// Register-blocked fp32 GEMM for larger M (qgemm_kernel.h): x ([M][K] of dtype xt_dt, row
// stride ldx) is first laid out as fp32 xt [ceil(M/16)][Kp][16], zero padded, by slices c
// in [c0, c1); then gemm_* computes y for tiles [t0, t1) from panels of dequantized fp32
// weights.
using TransposeXFn = void (*)(const void* x, DType xt_dt, int64_t ldx, int64_t M, int64_t K, int64_t Kp, float* xt,
                              int64_t c0, int64_t c1);
using GemmKernel = void (*)(const PackedView& p, const float* xt, int64_t M, const OutView& o, int64_t t0,
                            int64_t t1);
void transpose_x_avx512(const void* x, DType xt_dt, int64_t ldx, int64_t M, int64_t K, int64_t Kp, float* xt,
                        int64_t c0, int64_t c1);
void transpose_x_avx2(const void* x, DType xt_dt, int64_t ldx, int64_t M, int64_t K, int64_t Kp, float* xt,
                      int64_t c0, int64_t c1);
void gemm_avx512(const PackedView& p, const float* xt, int64_t M, const OutView& o, int64_t t0, int64_t t1);
void gemm_avx2(const PackedView& p, const float* xt, int64_t M, const OutView& o, int64_t t0, int64_t t1);

// Dequantizes tiles [t0, t1) to rows (w_out[(4t + r) - 4*t0][k], k < K, row stride ldw
// elements) of fp32 (wt F32) or bf16 (wt BF16, round to nearest even) weights (v - z) s.
using DequantFn = void (*)(const PackedView& p, void* w_out, DType wt, int64_t ldw, int64_t t0, int64_t t1);
void dequant_tiles_portable(const PackedView& p, void* w_out, DType wt, int64_t ldw, int64_t t0, int64_t t1);
void dequant_tiles_avx2(const PackedView& p, void* w_out, DType wt, int64_t ldw, int64_t t0, int64_t t1);
void dequant_tiles_avx512(const PackedView& p, void* w_out, DType wt, int64_t ldw, int64_t t0, int64_t t1);

// The walk every dequantizer shares: each real row of tiles [t0, t1), group by group.
// Calls fn(row, t, r, g, s, sz): row = offset of the output row in w_out (elements),
// s = scale and sz = s * z of row r of tile t in group g (OFF already taken out).
template <class Fn>
inline void for_each_row_group(const PackedView& p, int64_t ldw, int64_t t0, int64_t t1, Fn&& fn) {
  const float off = p.bits == 4 ? 128.f : 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t r = 0; r < kNR; ++r) {
      const int64_t n = t * kNR + r;
      if (n >= p.N) break;
      const int64_t row = (n - t0 * kNR) * ldw;
      for (int64_t g = 0; g < p.G; ++g) {
        const float* sb = p.sb + (t * p.G + g) * 2 * kNR;
        fn(row, t, r, g, sb[r], sb[kNR + r] - off * sb[r]);
      }
    }
  }
}

}  // namespace hfquant::cpu
