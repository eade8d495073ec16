// The CUDA kernel layout of the weight-only qlinear (docs/formats.md, "Kernel layout: CUDA").
//
// packed_weight uint8 [Np, Kp*bits/8]: row n holds the codes of output channel n (rows
// padded with zeros to Np = round_up(N, 64)), k padded with code 0 to Kp = round_up(K, KU),
// KU = 128 (4-bit) or 64 (8-bit) so that one 64-byte segment holds KU codes. Inside a
// segment the codes are permuted so that lane (g = lane/4, t = lane%4) of a warp gets,
// from one 16-byte load at byte 16*t of row n0+g, exactly the B fragments of
// mma.m16n8k16 (B[k][n] = W[n][k]) for the whole segment:
//   segment byte 16*t + 4*j + b is word j (j = 0..3) of lane t, byte b of that word.
//   4-bit: word j covers k32 chunk j (two k16 mma steps). Nibble p (bits 4p..4p+3) holds
//          k = 32j + 2t + (p >= 4) + 8*(p % 4), so (word >> 4i) & 0x000F000F picks the pair
//          (k, k+1) = (2t + 8i, 2t + 8i + 1): i = 0, 1 the B registers of step 0, i = 2, 3
//          of step 1 (the "magic number" conversion turns each pair into a half2 at once).
//   8-bit: word j covers k16 step j. Byte b holds k = 16j + 2t + (b & 1) + 8*(b >> 1):
//          bytes 0,1 the first B register, bytes 2,3 the second.
// packed_scales float32 [G, P, Np]: plane 0 the scale s[n, g], plane 1 (P = 2, asymmetric
// only) the zero point z[n, g] as a float; symmetric layers have P = 1 and z = 8 (4-bit)
// or 128 (8-bit, whose signed codes are stored as v = q + 128). Padded rows have s = z = 0.
// The weight is (v - z) * s, the same numbers as the CPU layout and the checkpoint.
#pragma once
#include <cstdint>

namespace hfquant::cuda {

constexpr int kRowPad = 64;   // Np multiple (the widest block covers 4 x 16 rows)
constexpr int kSegBytes = 64;  // bytes per row segment

__host__ __device__ constexpr int seg_k(int bits) { return bits == 4 ? 128 : 64; }

// Byte (within the row) and bit shift of element k of a row, for the given bits.
__host__ __device__ inline void code_position(int bits, int64_t k, int64_t& byte, int& shift) {
  if (bits == 4) {
    const int64_t u = k / 128;
    const int kk = int(k % 128), j = kk / 32, r = kk % 32;
    const int t = (r % 8) / 2, p = (r / 8) + 4 * (r % 2);
    byte = u * 64 + 16 * t + 4 * j + p / 2;
    shift = (p % 2) * 4;
  } else {
    const int64_t u = k / 64;
    const int kk = int(k % 64), j = kk / 16, r = kk % 16;
    const int t = (r % 8) / 2, b = (r % 2) + 2 * (r / 8);
    byte = u * 64 + 16 * t + 4 * j + b;
    shift = 0;
  }
}

}  // namespace hfquant::cuda
