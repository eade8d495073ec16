// Internal interface between the lut_linear dispatcher (lut_linear.cpp) and the per-ISA
// kernels (lut_linear_portable.cpp, lut_linear_avx2.cpp, lut_linear_avx512.cpp): the
// weight-clustering layer, y = x @ W^T + bias with W[n, k] = codebook[n, g(k), index(n, k)].
//
// Kernel layout (made by hfquant::lut_repack, never saved; docs/formats.md):
//   K is padded to Kp = round_up(K, 32); padded indices are 0 and padded x is 0.
//   idx  uint8 [N][Kp/2]: row n is Kp/32 units of 16 bytes; byte b of unit u holds the
//        index of k = 32u + b in its low nibble and of k = 32u + 16 + b in its high nibble.
//        2- and 3-bit indices are widened to nibbles: one kernel serves every bit width.
//        (One 16-byte load + vpmovzxbd gives 16 dword lanes whose low nibble is the index
//        of k = 32u + 0..15; a shift by 4 gives those of k = 32u + 16..31. vpermps reads
//        only bits 3:0 of each lane, so no mask is needed.)
//   tab  float32 [N][G][16]: codebook of row n and group g; entries >= 2^bits are 0.
//        16 floats = one zmm register (AVX-512) or two ymm (AVX2).
//   Groups are gs = group_size k long (Kp for one codebook per row); gs is a multiple of
//   32, so every unit lies in one group.
#pragma once
#include <cstdint>

namespace hfquant::cpu {

constexpr int64_t kLutUnitK = 32;   // k per 16-byte unit of a row
constexpr int64_t kLutTable = 16;   // table entries per (row, group)

struct LutView {
  const uint8_t* idx;
  const float* tab;
  int64_t N, K, Kp;  // true sizes and padded K
  int64_t G;         // groups per row
  int64_t gs;        // group length in k (Kp when one codebook per row); multiple of 32
};

// y[m][n] = sum_k W[n][k] x[m][k] (+ bias[n]) for rows n in [n0, n1) and all m < M.
// x: fp32 [M][Kp] zero padded (row stride Kp); y: fp32, row stride ldy; bias fp32 [N] or null.
using LutGemvFn = void (*)(const LutView& p, const float* x, int64_t M, float* y, int64_t ldy, const float* bias,
                           int64_t n0, int64_t n1);
void lut_gemv_portable(const LutView& p, const float* x, int64_t M, float* y, int64_t ldy, const float* bias,
                       int64_t n0, int64_t n1);
void lut_gemv_avx2(const LutView& p, const float* x, int64_t M, float* y, int64_t ldy, const float* bias,
                   int64_t n0, int64_t n1);
void lut_gemv_avx512(const LutView& p, const float* x, int64_t M, float* y, int64_t ldy, const float* bias,
                     int64_t n0, int64_t n1);

// Writes W[n][k] for rows [n0, n1) and k < Kp (padding decodes to codebook entry 0) to
// w[(n - n0) * ldw + k], fp32.
using LutDequantFn = void (*)(const LutView& p, float* w, int64_t ldw, int64_t n0, int64_t n1);
void lut_dequant_portable(const LutView& p, float* w, int64_t ldw, int64_t n0, int64_t n1);
void lut_dequant_avx2(const LutView& p, float* w, int64_t ldw, int64_t n0, int64_t n1);
void lut_dequant_avx512(const LutView& p, float* w, int64_t ldw, int64_t n0, int64_t n1);

}  // namespace hfquant::cpu
